"""Suite-wide: count host tests so CI can say how many ran and how many skipped."""

import os

HOST_DIRS = (os.sep + "host" + os.sep, os.sep + "workflows" + os.sep)


def pytest_terminal_summary(terminalreporter):
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    for outcome in counts:
        for rep in terminalreporter.stats.get(outcome, []):
            path = str(getattr(rep, "fspath", "") or rep.nodeid.split("::")[0])
            if any(d in os.sep + path.replace("/", os.sep) for d in HOST_DIRS) and rep.when in ("call", "setup"):
                counts[outcome] += 1
    terminalreporter.write_line(
        f"host tests: {counts['passed'] + counts['failed']} ran "
        f"({counts['passed']} passed, {counts['failed']} failed), {counts['skipped']} skipped"
        + ("" if counts["skipped"] == 0 else "  <-- set COMFYUI_PATH to a ComfyUI checkout to run them")
    )
