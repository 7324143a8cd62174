"""Fuzzing: CASES mutated ResNet-style models through `inspect` and `optimize` (cleanup + quantize).

Every case must end with exit 0 (the mutation was harmless and the output is a valid model) or a
clean error: exit 1 or 2, exactly one `deployopt: error:` line, no internal error, no traceback,
no hang, the input file unchanged, no staging folder left behind.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from benchmarks.fuzz import run_campaign, uncaught_exception
from benchmarks.tiny_resnet import export_tiny_resnet

CASES = 400


def _clean(result: dict) -> str | None:
    """None when the outcome is acceptable, else why not."""
    code, err = result["code"], result["stderr"]
    if code not in (0, 1, 2):
        return f"exit code {code}"
    if "Traceback" in err:
        return "traceback on stderr"
    errors = [line for line in err.splitlines() if line.startswith("deployopt: error:")]
    if code != 0 and len(errors) != 1:
        return f"{len(errors)} error lines"
    if uncaught_exception(err):
        return "uncaught exception: " + err.strip().splitlines()[-1]
    return None


@pytest.fixture(scope="module")
def campaign(tmp_path_factory):
    work = tmp_path_factory.mktemp("fuzz")
    seed = export_tiny_resnet(work / "seed.onnx")
    calibration = np.random.default_rng(0).random((16, 1, 8, 8), dtype=np.float32)
    return work, run_campaign(seed, work, CASES, calibration)


def test_every_mutant_ends_cleanly(campaign):
    work, records = campaign
    assert len(records) == CASES
    problems = []
    for record in records:
        if "hang" in record:
            problems.append((record["index"], record["mutation"], record["hang"]))
            continue
        for verb in ("inspect", "optimize"):
            why = _clean(record[verb])
            if why:
                problems.append((record["index"], record["mutation"], f"{verb}: {why}"))
        if record.get("input_unchanged") is False:
            problems.append((record["index"], record["mutation"], "input file changed"))
        out = work / f"case{record['index']:03d}" / "out"
        if out.is_dir() and any(p.name.startswith(".deployopt-staging") for p in out.iterdir()):
            problems.append((record["index"], record["mutation"], "staging folder left behind"))
    assert problems == []


def test_harmless_mutants_give_valid_models(campaign):
    work, records = campaign
    succeeded = [r for r in records if r.get("optimize", {}).get("code") == 0]
    for record in succeeded:
        onnx.checker.check_model(str(work / f"case{record['index']:03d}" / "out" / "model.onnx"), full_check=True)
    # the campaign exercises both outcomes: some mutants are harmless, most are refused
    refused = [r for r in records if r.get("inspect", {}).get("code") == 2]
    assert succeeded and len(refused) > CASES // 2
