"""The `mfattn` command line (`python -m mfattn`): its commands, the default
job, and `train`'s checks of its arguments before any work."""

import json
import re
import sys

import pytest

import mfattn
from mfattn import __main__ as cli


@pytest.fixture
def no_work(monkeypatch):
    """Any training or evaluation fails the test: the checks come first."""

    def forbidden(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    for name in ("train", "evaluate", "save_results", "load_latest"):
        monkeypatch.setattr(mfattn, name, forbidden)


@pytest.fixture
def study(monkeypatch):
    """`benchmarks.scaling.main` and `benchmarks.theorem7.main` replaced by a
    recorder of their arguments."""
    import benchmarks.scaling
    import benchmarks.theorem7

    calls = []
    for module in (benchmarks.scaling, benchmarks.theorem7):
        monkeypatch.setattr(module, "main", lambda argv=None, prog=None: calls.append((argv, prog)))
    return calls


def test_help_lists_the_commands(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    # one line each
    lines = dict(re.findall(r"^ {2,}(scaling|train|theorem7) {2,}(\S.*)$", out, re.M))
    assert "seed theorem" in lines["theorem7"]
    assert "convergence study" in lines["scaling"] and "train" in lines["train"]
    assert "python -m benchmarks.scaling" not in out


def test_unknown_command_names_the_commands(capsys, no_work, study):
    with pytest.raises(SystemExit) as e:
        cli.main(["trian"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'trian'" in err and "'scaling'" in err and "'train'" in err
    assert "'theorem7'" in err
    assert err.startswith("usage: mfattn ") and study == []


def test_no_arguments_run_the_quick_study(study):
    assert cli.main([]) == 0
    assert study == [(["--quick", "--out", "results/theorem7_quick.json"], "mfattn theorem7")]


def test_theorem7_forwards_every_flag(study):
    assert cli.main(["theorem7", "--gpu", "--budget", "60", "--help"]) == 0
    assert study == [(["--gpu", "--budget", "60", "--help"], "mfattn theorem7")]


def test_scaling_forwards_every_flag(study):
    assert cli.main(["scaling", "--medium", "--out", "x.json", "--help"]) == 0
    assert study == [(["--medium", "--out", "x.json", "--help"], "mfattn scaling")]


def test_a_missing_study_says_to_run_from_a_clone(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "benchmarks", None)  # import fails
    monkeypatch.setitem(sys.modules, "benchmarks.scaling", None)
    monkeypatch.setitem(sys.modules, "benchmarks.theorem7", None)
    monkeypatch.chdir(tmp_path)  # not a clone's root
    with pytest.raises(SystemExit) as e:
        cli.main([])
    assert e.value.code == 1
    assert "clone of the repository" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--lr", "-1"),
        ("--lr", "0"),
        ("--lr", "nan"),
        ("--weight-decay", "-0.001"),
        ("--weight-decay", "inf"),
        ("--batch-size", "0"),
        ("--steps", "-1"),
        ("--depth", "0"),
        ("--heads", "0"),
        ("--head-dim", "0"),
        ("--beta", "0"),
        ("--batch-size", "2.5"),
    ],
)
def test_train_rejects_bad_numbers_before_any_work(flag, value, tmp_path, capsys, no_work):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        cli.main(["train", flag, value, "--out", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}:" in err and repr(value) in err
    assert not out.exists()  # nothing created


def test_train_rejects_an_unwritable_out_before_any_work(tmp_path, capsys, no_work):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--out", str(blocker / "run")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "argument --out:" in err and str(blocker / "run") in err


def test_train_records_every_argument_and_the_resume(tmp_path, monkeypatch):
    # the work replaced by stand-ins: what `train` writes is under test
    class Result:
        model = None
        history = {"start_step": 40}  # train resumed this run at its step 40

    losses = iter([2.0, 1.0])
    monkeypatch.setattr(mfattn, "evaluate", lambda *a, **k: next(losses))
    monkeypatch.setattr(mfattn, "train", lambda *a, **k: Result())
    monkeypatch.setattr(mfattn, "save_results", lambda *a, **k: None)
    out = tmp_path / "run"
    argv = ["train", "--steps", "50", "--lr", "0.5", "--seed", "3", "--out", str(out)]
    assert cli.main(argv + ["--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed"] is True and summary["resumed_from_step"] == 40
    assert summary["heldout_before"] == 2.0 and summary["heldout_after"] == 1.0
    config = summary["config"]
    assert config["steps"] == 50 and config["lr"] == 0.5 and config["seed"] == 3
    assert config["out"] == str(out) and config["no_progress"] is True
    assert set(config) == {
        "steps", "depth", "heads", "head_dim", "beta", "lr", "weight_decay",
        "batch_size", "optimizer", "seed", "out", "no_progress", "no_resume",
    }  # fmt: skip
    assert [p.name for p in out.iterdir()] == ["summary.json"]  # no probe or temp file left


@pytest.mark.slow
def test_train_end_to_end_and_resume(tmp_path):
    out = tmp_path / "run"
    argv = ["train", "--steps", "2", "--depth", "1", "--heads", "2", "--batch-size", "2"]
    argv += ["--out", str(out), "--no-progress"]
    assert cli.main(argv) == 0
    first = json.loads((out / "summary.json").read_text())
    assert first["resumed"] is False and first["config"]["depth"] == 1
    assert cli.train_main(argv[1:]) == 0  # again: from the checkpoint of step 2
    again = json.loads((out / "summary.json").read_text())
    assert again["resumed"] is True and again["resumed_from_step"] == 2
    assert (out / "history.json").exists() and (out / "params.eqx").exists()


def test_kernel_builds_and_reports(capsys, monkeypatch):
    if mfattn.fused_cpu_available():
        assert cli.main(["kernel"]) == 0
        out = capsys.readouterr().out
        assert "fused CPU kernel: " in out and ".so" in out and "threads: " in out
    monkeypatch.setenv("MFATTN_FUSED_CPU", "0")
    assert cli.main(["kernel"]) == 1
    assert "MFATTN_FUSED_CPU=0" in capsys.readouterr().err
