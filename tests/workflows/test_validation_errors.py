"""Input problems come back from POST /prompt once each, filed under the input at fault.

ComfyUI files a VALIDATE_INPUTS message under *every* argument that VALIDATE_INPUTS names
(execution.py, ``validate_inputs``), so a node's VALIDATE_INPUTS must name only the input it checks."""

import uuid

import pytest

import dti_workflow_harness as h

RUN_TIMEOUT = 300.0

def upstream_of(prompt: dict, class_type: str) -> tuple[str, dict]:
    """(id, sub-prompt) of the one ``class_type`` node and everything it depends on: validation is
    then about that node alone (no other output can make the prompt valid)."""
    (nid,) = [k for k, v in prompt.items() if v["class_type"] == class_type]
    keep, todo = set(), [nid]
    while todo:
        k = todo.pop()
        if k in keep:
            continue
        keep.add(k)
        todo += [v[0] for v in prompt[k]["inputs"].values() if isinstance(v, list) and len(v) == 2]
    return nid, {k: prompt[k] for k in keep}


def post(server, prompt):
    return server.post_json("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})


def node_errors_of(server, prompt, nid):
    status, body = post(server, prompt)
    assert status == 400, (status, body)
    errors = body["node_errors"][nid]["errors"]
    return [(e["extra_info"].get("input_name"), e["details"]) for e in errors]


def widget_defaults(object_info, class_type) -> dict:
    """Every widget input of ``class_type`` at its default (combo: its first choice)."""
    out = {}
    info = object_info[class_type]["input"]
    for section in ("required", "optional"):
        for name, spec in (info.get(section) or {}).items():
            t = h.input_type(spec)
            if t == "COMBO":
                out[name] = h.input_options(spec).get("default", h.combo_values(spec)[0])
            elif t in h.WIDGET_TYPES:
                out[name] = h.input_options(spec)["default"]
    return out


def train_prompt(object_info, **inputs):
    """Checkpoint + one image -> DTI Train (built from /object_info, so it follows the node's inputs)."""
    train = dict(widget_defaults(object_info, "DTITrain"), model=["1", 0], clip=["1", 1], vae=["1", 2],
                 images=["2", 0], steps=1, batch_size=1, resolution=64)
    train.update(inputs)
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": h.SD15_CKPT}},
        "2": {"class_type": "LoadImage", "inputs": {"image": h.EXAMPLE_IMAGES[0]}},
        "3": {"class_type": "DTITrain", "inputs": train},
    }
    return "3", prompt


def test_train_bad_name_is_one_error_on_name(server, object_info):
    nid, prompt = train_prompt(object_info, name="my concept")
    errors = node_errors_of(server, prompt, nid)
    assert len(errors) == 1, errors
    assert errors[0][0] == "name" and "my concept" in errors[0][1], errors


def test_train_empty_initializer_is_one_error_naming_the_initializer(server, object_info):
    """Never filed under `name`; reported once, at validation (filed under `initializer`) or when
    the node runs (its message names the initializer)."""
    nid, prompt = train_prompt(object_info, name="init-check", initializer="  ")
    status, body = post(server, prompt)
    if status == 400:
        errors = [(e["extra_info"].get("input_name"), e["details"]) for e in body["node_errors"][nid]["errors"]]
        assert errors == [("initializer", errors[0][1])], errors
        return
    assert status == 200 and not body.get("node_errors"), body
    entry = server.wait(body["prompt_id"], timeout=RUN_TIMEOUT)
    failures = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert len(failures) == 1 and failures[0]["node_id"] == nid, failures
    assert "initializer" in failures[0]["exception_message"], failures
    assert not (server.embeddings / "init-check.safetensors").exists()


def test_train_bad_name_and_empty_initializer_never_blame_each_other(server, object_info):
    nid, prompt = train_prompt(object_info, name="bad name", initializer="")
    errors = node_errors_of(server, prompt, nid)
    for input_name, details in errors:
        if input_name == "name":
            assert "initializer" not in details, errors
        else:
            assert input_name == "initializer" and "bad name" not in details, errors
    assert [i for i, _ in errors].count("name") == 1, errors


def test_slerp_bad_name_is_one_error_on_name(server, object_info):
    prompt = h.ui_to_api(h.load_workflow("dti_slerp_concepts.json"), object_info)
    h.set_inputs(prompt, "DTISlerpConcepts", name="../escape")
    nid, prompt = upstream_of(prompt, "DTISlerpConcepts")
    errors = node_errors_of(server, prompt, nid)
    assert len(errors) == 1 and errors[0][0] == "name" and "escape" in errors[0][1], errors
