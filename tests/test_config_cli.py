import subprocess
import sys

import pytest

from helpers import run_negjax
from negjax import config
from negjax.errors import NegjaxError


def test_defaults_validate_and_roundtrip(tmp_path):
    cfg = config.load_config()
    path = tmp_path / "c.toml"
    path.write_text(config.to_toml(cfg))
    assert config.load_config(path) == cfg


def test_file_and_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('workdir = "/tmp/x"\n[train]\nsteps = 5\nlearning_rate = 1e-3\n')
    cfg = config.load_config(path, ["train.steps=7", "loss.symmetric=true", "data.length_buckets=[16, 32]",
                                    "model.name=minilm", "loss.temperature=1"])
    assert cfg.workdir == "/tmp/x"
    assert cfg.train.steps == 7 and cfg.train.learning_rate == 1e-3
    assert cfg.loss.symmetric is True and cfg.loss.temperature == 1.0
    assert cfg.data.length_buckets == [16, 32]
    assert cfg.model.name == "minilm"


@pytest.mark.parametrize("override, key", [
    ("train.stepz=3", "train.stepz"),
    ("nosection.x=1", "nosection"),
    ("train.steps=abc", "train.steps"),
    ("train.steps=1.5", "train.steps"),
    ("loss.symmetric=1", "loss.symmetric"),
    ("train.batch_size=0", "train.batch_size"),
    ("model.dtype=float16", "model.dtype"),
    ("mining.rank_range=5:2", "mining.rank_range"),
    ("train=3", "train"),
    ('loss.precision="fast"', "loss.precision"),
    ("distributed.fsdp=0", "distributed.fsdp"),
])
def test_bad_overrides_name_the_key(override, key):
    with pytest.raises(NegjaxError, match=key.replace(".", r"\.")):
        config.load_config(None, [override])


def test_bad_toml_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[train]\nsteps = 'many'\n")
    with pytest.raises(NegjaxError, match="train.steps"):
        config.load_config(path)
    path.write_text("[train\n")
    with pytest.raises(NegjaxError, match="invalid TOML"):
        config.load_config(path)
    with pytest.raises(NegjaxError, match="not found"):
        config.load_config(tmp_path / "missing.toml")


def test_every_key_documented():
    rows = config.describe_keys()
    assert len(rows) > 50
    assert all(doc for _, _, doc in rows)


def test_cli_help_and_config_errors():
    proc = run_negjax("--help")
    assert proc.returncode == 0 and "config" in proc.stdout
    proc = run_negjax("config", "show", "--set", "train.stepz=3")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "train.stepz" in proc.stderr
    proc = run_negjax("config", "show", "--set", "train.steps=abc")
    assert proc.returncode == 2 and "train.steps" in proc.stderr
    proc = run_negjax("config", "show", "--set", "train.steps=9")
    assert proc.returncode == 0 and "steps = 9" in proc.stdout
    proc = run_negjax("no-such-command")
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0


def test_console_script_installed():
    proc = subprocess.run([sys.executable, "-c", "import importlib.metadata as m; "
                           "print([e.value for e in m.entry_points(group='console_scripts') if e.name == 'negjax'])"],
                          capture_output=True, text=True)
    assert "negjax.cli:entry" in proc.stdout


def test_configs_are_frozen_and_updated_makes_a_validated_copy():
    import dataclasses

    cfg = config.load_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.steps = 3
    new = config.updated(cfg, {"train.steps": 3, "mining.negatives_kept": 4})
    assert (new.train.steps, new.mining.negatives_kept) == (3, 4)
    assert cfg.train.steps == 1000 and cfg.mining.negatives_kept == 32  # unchanged
    with pytest.raises(NegjaxError, match="train.steps"):
        config.updated(cfg, {"train.steps": 0})


@pytest.mark.parametrize("old, new, value", [(o, n, 7) for o, n in config.RENAMED.items()])
def test_renamed_keys_still_work_with_a_warning(tmp_path, old, new, value):
    from negjax.errors import NegjaxDeprecationWarning

    section, key = old.split(".")
    path = tmp_path / "old.toml"
    path.write_text(f"[{section}]\n{key} = {value}\n")
    for args in ((path, []), (None, [f"{old}={value}"])):
        with pytest.warns(NegjaxDeprecationWarning, match=f"{old}.*use '{new}'"):
            cfg = config.load_config(*args)
        got = cfg
        for part in new.split("."):
            got = getattr(got, part)
        assert got == value
    assert old not in config.to_toml(cfg) and new.split(".")[1] in config.to_toml(cfg)


def test_renamed_flags_still_work_with_a_warning():
    from negjax.cli import build_parser
    from negjax.errors import NegjaxDeprecationWarning

    parser = build_parser()
    with pytest.warns(NegjaxDeprecationWarning, match="--num-negatives.*--negatives-kept"):
        args = parser.parse_args(["mine", "--out", "x", "--num-negatives", "3", "--batch-size",
                                  "8", "--max-length", "40"])
    assert (args.negatives_kept, args.encode_batch_size, args.doc_max_length) == (3, 8, 40)
    args = parser.parse_args(["mine", "--out", "x", "--negatives-kept", "5"])
    assert args.negatives_kept == 5 and args.encode_batch_size is None
    with pytest.warns(NegjaxDeprecationWarning, match="--batch-size"):
        args = parser.parse_args(["eval", "--model", "tiny", "--batch-size", "16"])
    assert args.encode_batch_size == 16
    assert parser.parse_args(["encode", "--input", "i", "--output", "o"]).encode_batch_size == 128
    # the CLI prints the warning as one readable line
    proc = run_negjax("mine", "--out", "/nonexistent/x", "--num-negatives", "3", "--rank-range", "5:2")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 2
    assert lines[0].startswith("negjax: warning: flag --num-negatives is deprecated")


def test_progress_is_plain_lines_in_a_log(monkeypatch, capsys):
    """stderr not a terminal (a pod's log file): count, rate and ETA as lines, one per
    NEGJAX_PROGRESS_EVERY seconds (0: every update), the units of a resumed run not counted
    in the rate; a last line says how it ended. NEGJAX_PROGRESS=0 silences it."""
    from negjax.utils import LineProgress, progress

    monkeypatch.setenv("NEGJAX_PROGRESS", "")
    monkeypatch.setenv("NEGJAX_PROGRESS_EVERY", "0")
    bar = progress(total=10, desc="train", unit="step", initial=4)
    assert isinstance(bar, LineProgress)
    bar.update(2)
    bar.set_postfix(loss="0.5")
    bar.close()
    bar.close()  # once only
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and lines[0].startswith("negjax: train: 6/10 step (60%), ")
    assert " step/s, ETA " in lines[0] and "stopped after" in lines[1] and lines[1].endswith("loss=0.5")
    monkeypatch.setenv("NEGJAX_PROGRESS_EVERY", "3600")
    assert list(progress(range(5), desc="tokenise docs", unit="text")) == [0, 1, 2, 3, 4]
    lines = capsys.readouterr().err.splitlines()  # the first update, then the end
    assert [x.split(":")[1].strip() for x in lines] == ["tokenise docs"] * 2
    assert "1/5 text" in lines[0] and "5/5 text (100%)" in lines[1] and "finished in" in lines[1]
    monkeypatch.setenv("NEGJAX_PROGRESS", "0")
    bar = progress(total=3, desc="quiet")
    bar.update(3)
    bar.close()
    assert capsys.readouterr().err == ""
