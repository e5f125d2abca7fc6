"""Scale-out over GPUs: xdist worker pinning, campaign shards and their merge (CPU only)."""

import json
import sys
import warnings

import pytest

import flashcheck.verify.campaign as campaign
from flashcheck.reports.records import read_cases
from flashcheck.verify import scaleout
from flashcheck.verify.campaign import CampaignConfig, run_campaign
from flashcheck.verify.scaleout import gpu_for_worker, merge_shards, pin_worker_gpu, shard_commands


@pytest.mark.parametrize("n_gpus", [2, 4, 8])
def test_workers_go_round_robin_over_the_gpus(n_gpus):
    got = [gpu_for_worker(f"gw{i}", n_gpus) for i in range(8)]
    assert got == [i % n_gpus for i in range(8)]
    # every GPU gets a worker, and none gets two more than another
    counts = [got.count(g) for g in range(n_gpus)]
    assert min(counts) >= 1 and max(counts) - min(counts) <= 1


def test_no_xdist_means_no_gpu_and_no_change():
    assert gpu_for_worker(None, 4) is None
    env = {"CUDA_VISIBLE_DEVICES": "0,1"}
    assert pin_worker_gpu(env) is None
    assert env == {"CUDA_VISIBLE_DEVICES": "0,1"}


@pytest.mark.parametrize("bad, error", [("gw", ValueError), ("worker1", ValueError), ("gw-1", ValueError),
                                         (3, TypeError)])
def test_bad_worker_ids_are_rejected(bad, error):
    with pytest.raises(error, match="worker_id"):
        gpu_for_worker(bad, 2)


@pytest.mark.parametrize("n", [0, -1, True, 2.0])
def test_bad_gpu_counts_are_rejected(n):
    with pytest.raises((ValueError, TypeError), match="n_gpus"):
        gpu_for_worker("gw0", n)


@pytest.mark.parametrize("worker, expected", [("gw0", "2"), ("gw1", "5"), ("gw3", "5"), ("gw4", "2")])
def test_pinning_picks_from_the_visible_list(worker, expected):
    env = {"PYTEST_XDIST_WORKER": worker, "CUDA_VISIBLE_DEVICES": "2,5"}
    assert pin_worker_gpu(env) == expected
    assert env["CUDA_VISIBLE_DEVICES"] == expected
    # a second call (conftest imported twice) keeps the pin instead of re-mapping the narrowed list
    assert pin_worker_gpu(env) == expected


def test_pinning_from_the_gpu_count_variable():
    pinned = []
    for i in range(8):
        env = {"PYTEST_XDIST_WORKER": f"gw{i}", "FLASHCHECK_GPUS": "4"}
        pinned.append(pin_worker_gpu(env))
    assert pinned == ["0", "1", "2", "3"] * 2


def test_pinning_with_n_gpus_uses_a_prefix_of_the_visible_list():
    env = {"PYTEST_XDIST_WORKER": "gw1", "CUDA_VISIBLE_DEVICES": "4,5,6"}
    assert pin_worker_gpu(env, n_gpus=2) == "5"
    env = {"PYTEST_XDIST_WORKER": "gw1", "CUDA_VISIBLE_DEVICES": "4,5"}
    with pytest.raises(ValueError, match="lists only 2"):
        pin_worker_gpu(env, n_gpus=3)


def test_pinning_rejects_a_bad_gpu_count_variable():
    with pytest.raises(ValueError, match="FLASHCHECK_GPUS"):
        pin_worker_gpu({"PYTEST_XDIST_WORKER": "gw0", "FLASHCHECK_GPUS": "two"})


def test_pinning_without_any_gpu_leaves_the_environment(monkeypatch):
    monkeypatch.setattr(scaleout, "count_gpus", lambda: 0)
    env = {"PYTEST_XDIST_WORKER": "gw2"}
    assert pin_worker_gpu(env) is None
    assert env == {"PYTEST_XDIST_WORKER": "gw2"}
    # an empty list hides every GPU on purpose: keep it
    env = {"PYTEST_XDIST_WORKER": "gw2", "CUDA_VISIBLE_DEVICES": ""}
    assert pin_worker_gpu(env) is None and env["CUDA_VISIBLE_DEVICES"] == ""


def test_pinning_does_not_override_once_cuda_is_initialised(monkeypatch):
    class FakeCuda:
        @staticmethod
        def is_initialized():
            return True

    class FakeTorch:
        cuda = FakeCuda

    monkeypatch.setitem(sys.modules, "torch", FakeTorch)
    env = {"PYTEST_XDIST_WORKER": "gw1", "CUDA_VISIBLE_DEVICES": "0,1"}
    with pytest.warns(RuntimeWarning, match="already initialised"):
        assert pin_worker_gpu(env) is None
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1"


def test_shard_commands_carry_shard_device_and_output():
    base = ["--target", "triton", "--seed", "7", "--out", "reports/nightly", "--device", "cuda"]
    commands = shard_commands(4, base, python="py")
    assert len(commands) == 4
    for i, (env, argv) in enumerate(commands):
        assert env == {"CUDA_VISIBLE_DEVICES": str(i)}
        assert argv[:4] == ["py", "-m", "flashcheck", "fuzz"]
        assert argv[argv.index("--shard") + 1] == f"{i}/4"
        assert argv.count("--out") == 1 and argv[argv.index("--out") + 1] == f"reports/nightly/shard-{i}"
        assert argv[argv.index("--seed") + 1] == "7"  # same seed everywhere: the shards split one stream
    env, argv = shard_commands(2, ["--target", "t", "--out=x"], devices=["2", "5"])[1]
    assert env == {"CUDA_VISIBLE_DEVICES": "5"} and argv[-1] == "x/shard-1"


def test_shard_commands_reject_bad_arguments():
    with pytest.raises(ValueError, match="--shard"):
        shard_commands(2, ["--target", "t", "--shard", "0/2"])
    with pytest.raises(TypeError, match="list of strings"):
        shard_commands(2, "--target t")
    with pytest.raises(ValueError, match="devices lists 1"):
        shard_commands(2, ["--target", "t"], devices=["0"])
    with pytest.raises(ValueError, match="n_gpus"):
        shard_commands(0, ["--target", "t"])


def _campaign(out, shard, seed=3):
    # A target that declines nothing and no exploitation: the unsharded run then
    # deals the same plans as the shards (which neither learn nor exploit).
    cfg = CampaignConfig(targets=["sdpa-math"], max_examples=12, isolate=False, progress=False,
                         seed=seed, shard=shard, out=out, exploit=0.0)
    return run_campaign(cfg)


def _ids(result):
    return {row["case_id"] for row in result.rows}


@pytest.fixture(scope="module")
def untargeted_shards(tmp_path_factory):
    """Shards 0/1, 0/3, 1/3, 2/3 with Hypothesis' targeted search switched off."""
    root = tmp_path_factory.mktemp("shards")
    mp = pytest.MonkeyPatch()
    mp.setattr(campaign, "hypothesis_target", lambda *args, **kwargs: None)
    try:
        runs = {sh: _campaign(root / f"s{sh[0]}of{sh[1]}", sh) for sh in [(0, 1), (0, 3), (1, 3), (2, 3)]}
    finally:
        mp.undo()
    return root, runs


def test_shards_partition_the_campaign(untargeted_shards):
    _, runs = untargeted_shards
    parts = [_ids(runs[(i, 3)]) for i in range(3)]
    assert all(parts)
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert parts[0] | parts[1] | parts[2] == _ids(runs[(0, 1)])
    assert sum(r.cases for r in (runs[(i, 3)] for i in range(3))) == runs[(0, 1)].cases == 12


def test_sharded_runs_do_not_use_targeted_search(tmp_path, monkeypatch):
    """Targeted search would steer each shard by its own cases, so shards
    would drift apart; a sharded campaign generates without it."""
    calls = []
    monkeypatch.setattr(campaign, "hypothesis_target", lambda *a, **k: calls.append(a))
    _campaign(tmp_path / "s1", (1, 3))
    assert calls == []
    _campaign(tmp_path / "all", (0, 1))
    assert calls, "an unsharded campaign does use targeted search"


def test_merge_shards_gives_the_union(untargeted_shards, tmp_path):
    root, runs = untargeted_shards
    dirs = [root / f"s{i}of3" for i in range(3)]
    rows = merge_shards(dirs, tmp_path / "merged", meta={"seed": 3})
    assert {r["case_id"] for r in read_cases(tmp_path / "merged")} == _ids(runs[(0, 1)])
    assert len(rows) == sum(len(runs[(i, 3)].rows) for i in range(3))
    summary = json.loads((tmp_path / "merged" / "summary.json").read_text())
    unsharded = json.loads((root / "s0of1" / "summary.json").read_text())
    assert summary["totals"] == unsharded["totals"]
    assert (tmp_path / "merged" / "index.html").is_file()
    # merging again replaces the rows instead of appending
    merge_shards(dirs, tmp_path / "merged")
    assert len(read_cases(tmp_path / "merged")) == len(rows)


def test_merge_shards_rejects_overlap_and_missing_dirs(untargeted_shards, tmp_path):
    root, _ = untargeted_shards
    with pytest.raises(ValueError, match="overlap"):
        merge_shards([root / "s0of3", root / "s0of1"], tmp_path / "m")
    with pytest.raises(FileNotFoundError):
        merge_shards([tmp_path / "nope"], tmp_path / "m")
    with pytest.raises(ValueError, match="at least one"):
        merge_shards([], tmp_path / "m")


def test_merge_command_line(untargeted_shards, tmp_path):
    root, runs = untargeted_shards
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        code = scaleout.main(["merge", "--out", str(tmp_path / "m")] + [str(root / f"s{i}of3") for i in range(3)])
    assert code == 0
    assert {r["case_id"] for r in read_cases(tmp_path / "m")} == _ids(runs[(0, 1)])
    assert scaleout.main(["merge", "--out", str(tmp_path / "m2"), str(tmp_path / "missing")]) == 2


def test_several_shards_share_each_gpu():
    from flashcheck.verify.scaleout import shard_commands

    cmds = shard_commands(2, ["--target", "triton", "--out", "r"], python="py", per_gpu=3)
    assert len(cmds) == 6
    assert [env["CUDA_VISIBLE_DEVICES"] for env, _ in cmds] == ["0", "1", "0", "1", "0", "1"]
    assert [argv[argv.index("--shard") + 1] for _, argv in cmds] == [f"{i}/6" for i in range(6)]
    with pytest.raises(ValueError):
        shard_commands(2, ["--out", "r"], per_gpu=0)


def test_merged_profile_adds_shards_up(tmp_path):
    import json

    from flashcheck.verify.scaleout import merged_profile

    for i, (cases, oracle) in enumerate([(10, 1.5), (14, 2.5)]):
        d = tmp_path / f"shard-{i}"
        d.mkdir()
        prof = {"phases": {"oracle": {"seconds": oracle, "calls": cases}}, "cases": cases, "wall_s": 5.0}
        (d / "meta.json").write_text(json.dumps({"profile": prof}))
    merged = merged_profile([tmp_path / "shard-0", tmp_path / "shard-1"], wall=6.0)
    assert merged["cases"] == 24 and merged["cases_per_s"] == 4.0
    assert merged["phases"]["oracle"] == {"seconds": 4.0, "calls": 24}
