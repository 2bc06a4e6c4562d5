"""Splitting a jobs file into shards (``python -m dti_cli --shard K/N``): pure, no ComfyUI."""

import json
import random

import pytest

from dti_cli.shards import ShardError, Summary, parse_shard, select, shard_of


def jobs(names):
    return [{"inputs": {"name": n}, "where": f"job {i}"} for i, n in enumerate(names, 1)]


NAMES = [f"concept-{i}" for i in range(40)] + ["styles/watercolour", "a.b_c-d", "x"]


@pytest.mark.parametrize("n", range(1, 8))
def test_every_job_lands_in_exactly_one_shard_whatever_the_order(n):
    shards = [[j["inputs"]["name"] for j in select(jobs(NAMES), k, n)] for k in range(n)]
    flat = [name for s in shards for name in s]
    assert sorted(flat) == sorted(NAMES) and len(flat) == len(set(flat))
    shuffled = list(NAMES)
    random.Random(n).shuffle(shuffled)
    again = [sorted(j["inputs"]["name"] for j in select(jobs(shuffled), k, n)) for k in range(n)]
    assert again == [sorted(s) for s in shards]
    assert all(shard_of(name, n) == k for k, s in enumerate(shards) for name in s)


def test_shards_keep_the_file_order_and_spread_the_jobs():
    picked = select(jobs(NAMES), 1, 3)
    assert [j["inputs"]["name"] for j in picked] == [n for n in NAMES if shard_of(n, 3) == 1]
    sizes = [len(select(jobs(NAMES), k, 3)) for k in range(3)]
    assert min(sizes) >= 5, sizes  # 43 names: no shard starves


@pytest.mark.parametrize("text", ["3/2", "0/0", "a/b", "1/", "-1/2", "2/2", "", "1/2/3", "auto/2"])
def test_bad_shard_specs_are_refused(text):
    with pytest.raises(ShardError, match="--shard"):
        parse_shard(text, env={})


def test_parse_shard_and_auto_from_slurm_and_kubernetes():
    assert parse_shard("0/4", env={}) == (0, 4) and parse_shard(" 3 / 4 ", env={}) == (3, 4)
    slurm = {"SLURM_ARRAY_TASK_ID": "12", "SLURM_ARRAY_TASK_MIN": "10", "SLURM_ARRAY_TASK_COUNT": "4"}
    assert parse_shard("auto", env=slurm) == (2, 4)
    assert parse_shard("auto", env={"JOB_COMPLETION_INDEX": "5", "JOB_COMPLETIONS": "8"}) == (5, 8)
    for env, message in (({}, "no array task here"),
                         ({"SLURM_ARRAY_TASK_ID": "1"}, "SLURM_ARRAY_TASK_COUNT"),
                         ({"JOB_COMPLETION_INDEX": "1"}, "JOB_COMPLETIONS"),
                         ({"JOB_COMPLETION_INDEX": "9", "JOB_COMPLETIONS": "8"}, "shard 9 of 8 does not exist")):
        with pytest.raises(ShardError, match=message):
            parse_shard("auto", env=env)


def test_summary_appends_one_json_line_per_job_and_a_closing_line(tmp_path):
    path = tmp_path / "runs.jsonl"
    path.write_text('{"earlier": true}\n')
    s = Summary(str(path), (1, 3))
    s.job("a", "trained", 1.5, path="/e/a.safetensors")
    s.job("b", "reused", 0.1, path="/e/b.safetensors")
    s.job("c", "failed", 0.2, error="clash")
    line = s.close()
    records = [json.loads(x) for x in path.read_text().splitlines()]
    assert records[0] == {"earlier": True}
    assert [(r["job"], r["status"], r["shard"]) for r in records[1:4]] == [("a", "trained", "1/3"), ("b", "reused", "1/3"),
                                                                          ("c", "failed", "1/3")]
    assert records[3]["error"] == "clash" and records[4]["summary"] == {"trained": 1, "reused": 1, "failed": 1}
    assert line.startswith("dti_cli: shard 1/3: 3 job(s): 1 trained, 1 reused, 1 failed in ")
