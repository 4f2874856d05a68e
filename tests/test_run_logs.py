"""Run folders that explain themselves: log.txt with what the command printed, --log-level, and
`select --write-rejected`."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_jsonl
from mechsieve.cli import main
from mechsieve.store import runlog
from mechsieve.store.outputs import MARKER

pytestmark = pytest.mark.timeout(300)


def _pool(tmp_path: Path, n: int = 7) -> Path:
    return write_jsonl(tmp_path / "pool.jsonl", [{"instruction": f"Say {i}.", "output": f"{i}", "row": i}
                                                 for i in range(n)])


def test_visible_line_keeps_what_a_terminal_shows():
    bar = "".join(f"\rtrain:  {p}%|\x1b[32m{'#' * (p // 10)}\x1b[0m| {p}/100" for p in range(0, 101, 25))
    assert runlog.visible_line(bar) == "train:  100%|##########| 100/100"
    assert runlog.visible_line("done\r") == "done"  # \r\n line ends
    assert runlog.visible_line("old text\r        \rnew") == "new"
    assert runlog.visible_line("bar 50%\r       ") == "bar 50%"
    assert runlog.visible_line("  indented, trailing  ") == "  indented, trailing"
    assert runlog.visible_line("") == ""


def test_a_run_log_tees_lines_and_puts_the_streams_back(tmp_path):
    out, err = io.StringIO(), io.StringIO()
    before = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    try:
        with runlog.RunLog("mechsieve demo-cmd --x 1") as run:
            print("before the folder")
            sys.stderr.write("a bar\r a bar 50%\r a bar 100%")
            sys.stderr.flush()
            assert runlog.waiting() and runlog.current_log() is None
            assert runlog.attach(tmp_path, append=False) == tmp_path / "log.txt"
            assert not runlog.waiting() and runlog.attach(tmp_path / "second") is None  # the first folder wins
            sys.stderr.write("\n")
            print("part", end="")
            print(" one line")
            run.note("Traceback (most recent call last):\n  boom")
            print("unfinished", end="")
        assert (sys.stdout, sys.stderr) == (out, err)
    finally:
        sys.stdout, sys.stderr = before
    # the terminal saw everything, untouched
    assert out.getvalue() == "before the folder\npart one line\nunfinished"
    assert err.getvalue() == "a bar\r a bar 50%\r a bar 100%\n"
    lines = (tmp_path / "log.txt").read_text().splitlines()
    assert lines[0].startswith("# mechsieve demo-cmd --x 1  (")
    assert lines[1:] == ["before the folder", " a bar 100%", "part one line", "Traceback (most recent call last):",
                         "  boom", "unfinished"]
    assert not (tmp_path / "second").exists() and not runlog.waiting()


def test_a_bar_redrawn_many_times_keeps_the_buffer_small():
    with runlog.RunLog("x") as run:
        for i in range(5000):
            sys.stderr.write(f"\rstep {i}")
        assert len(run._partial["stderr"]) < 20
        sys.stderr.write("\n")
        assert run._buffer[-1] == "step 4999"


def test_importing_the_cli_changes_no_stream_or_logger():
    code = ("import logging, sys; out, err = sys.stdout, sys.stderr; import mechsieve.cli, mechsieve.store.runlog; "
            "assert (sys.stdout, sys.stderr) == (out, err); lg = logging.getLogger('mechsieve'); "
            "assert lg.handlers == [] and lg.level == logging.NOTSET; print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_select_writes_log_txt_with_what_it_printed(tmp_path, capsys):
    before = sys.stdout, sys.stderr
    out = tmp_path / "sel"
    assert main(["select", "--method", "random", "--pool", str(_pool(tmp_path)), "--budget", "3",
                 "--out", str(out)]) == 0
    assert (sys.stdout, sys.stderr) == before
    printed = capsys.readouterr().out
    log = (out / "log.txt").read_text()
    header, *lines = log.splitlines()
    assert header.startswith("# mechsieve select --method random --pool ")
    assert lines == printed.splitlines()  # the same lines, in order
    assert "selected 3 of 7" in log
    assert [ln.split() for ln in lines if ln.startswith("  log ")] == [["log", str(out / "log.txt")]]
    assert "log.txt" in json.loads((out / MARKER).read_text())["files"]
    # --overwrite starts the file anew; an error after the folder is claimed is in it as well
    assert main(["select", "--method", "random", "--pool", str(_pool(tmp_path)), "--budget", "3",
                 "--out", str(out), "--overwrite", "--quiet"]) == 0
    assert (out / "log.txt").read_text().count("# mechsieve select") == 1


def test_an_error_before_the_folder_leaves_no_log_and_one_after_is_logged(tmp_path, capsys, monkeypatch):
    pool = _pool(tmp_path)
    out = tmp_path / "sel"
    assert main(["select", "--method", "random", "--pool", str(tmp_path / "missing.jsonl"), "--out", str(out)]) == 2
    assert not out.exists()
    import mechsieve.select as select_module

    def broken(*args, **kwargs):
        raise FileNotFoundError("the disk went away")

    monkeypatch.setattr(select_module, "write_selection", broken)
    assert main(["select", "--method", "random", "--pool", str(pool), "--budget", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "the disk went away" in err
    assert "mechsieve select: error: the disk went away" in (out / "log.txt").read_text()


def test_a_users_own_log_txt_is_left_alone(tmp_path, capsys):
    out = tmp_path / "sel"
    assert main(["select", "--method", "random", "--pool", str(_pool(tmp_path)), "--budget", "2",
                 "--out", str(out)]) == 0
    (out / "log.txt").unlink()
    marker = json.loads((out / MARKER).read_text())
    marker["files"].remove("log.txt")
    (out / MARKER).write_text(json.dumps(marker))
    (out / "log.txt").write_text("my notes\n")  # now a file mechsieve did not write
    assert main(["select", "--method", "random", "--pool", str(_pool(tmp_path)), "--budget", "2",
                 "--out", str(out), "--overwrite"]) == 0
    assert (out / "log.txt").read_text() == "my notes\n"
    assert "log.txt" not in json.loads((out / MARKER).read_text())["files"]


@pytest.mark.parametrize("where", ["before", "after"])
def test_log_level_sets_mechsieve_loggers_and_is_put_back(where, tmp_path, capsys, monkeypatch):
    import mechsieve.commands.select as select_command

    seen = {}
    real = select_command.method_list

    def spy(method):
        lg = logging.getLogger("mechsieve.select")
        seen["level"] = logging.getLogger("mechsieve").level
        lg.debug("a debug line")
        lg.info("an info line")
        lg.warning("a warning line")
        return real(method)

    monkeypatch.setattr(select_command, "method_list", spy)
    out = tmp_path / "sel"
    args = ["select", "--method", "random", "--pool", str(_pool(tmp_path)), "--budget", "2", "--out", str(out)]
    argv = ["--log-level", "WARNING", *args] if where == "before" else [*args, "--log_level", "warning"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert seen["level"] == logging.WARNING
    assert "mechsieve.select: warning: a warning line" in err and "info line" not in err and "debug" not in err
    assert main([*args, "--overwrite", "--log-level", "debug"]) == 0
    err = capsys.readouterr().err
    assert "mechsieve.select: debug: a debug line" in err and "mechsieve.select: an info line" in err
    logger = logging.getLogger("mechsieve")
    assert logger.level == logging.NOTSET and logger.handlers == []  # as before the command
    with pytest.raises(SystemExit):
        main(["--log-level", "loud", "select"])
    assert "invalid choice: 'loud'" in capsys.readouterr().err
    from mechsieve.cli import build_parser

    parser, _ = build_parser()  # also after a command's own subcommand
    assert parser.parse_args(["sae", "train", "--log-level", "error"]).log_level == "error"
    assert parser.parse_args(["sae", "train"]).log_level == "info"


def test_select_write_rejected_writes_the_rest_in_the_same_format(tmp_path, capsys):
    pool = _pool(tmp_path)
    out = tmp_path / "sel"
    assert main(["select", "--method", "random", "--pool", str(pool), "--budget", "3", "--out", str(out),
                 "--write-rejected", "--quiet"]) == 0
    chosen = [json.loads(line) for line in (out / "selected.jsonl").read_text().splitlines()]
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert len(chosen) == 3 and len(rejected) == 4
    assert set(rejected[0]) == {"instruction", "output", "row"}  # the pool's own records, as the subset's
    assert sorted(r["row"] for r in chosen + rejected) == list(range(7))
    assert [r["row"] for r in rejected] == sorted(r["row"] for r in rejected)  # in pool order
    assert "rejected.jsonl" in json.loads((out / MARKER).read_text())["files"]
    assert str(out / "rejected.jsonl") in capsys.readouterr().out
    # several methods: one rejected file in each method's folder, the complement of its subset
    many = tmp_path / "many"
    assert main(["select", "--method", "random,full", "--pool", str(pool), "--budget", "2", "--out", str(many),
                 "--write-rejected", "--quiet"]) == 0
    for method, kept in (("random", 2), ("full", 7)):
        chosen = [json.loads(line)["row"] for line in (many / method / "selected.jsonl").read_text().splitlines()]
        rejected = [json.loads(line)["row"] for line in (many / method / "rejected.jsonl").read_text().splitlines()]
        assert len(chosen) == kept and sorted(chosen + rejected) == list(range(7))
    # off by default
    plain = tmp_path / "plain"
    assert main(["select", "--method", "random", "--pool", str(pool), "--budget", "3", "--out", str(plain),
                 "--quiet"]) == 0
    assert not (plain / "rejected.jsonl").exists()


def test_write_rejected_keeps_a_dataset_folders_layout(tmp_path):
    import datasets

    folder = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"text": f"t{i}"} for i in range(5)])}) \
        .save_to_disk(str(folder))
    out = tmp_path / "out"
    assert main(["select", "--method", "random", "--pool", str(folder), "--budget", "2", "--out", str(out),
                 "--write-rejected", "--quiet"]) == 0
    chosen = datasets.load_from_disk(str(out / "selected"))["train"]["text"]
    rejected = datasets.load_from_disk(str(out / "rejected"))["train"]["text"]
    assert len(rejected) == 3 and sorted([*chosen, *rejected]) == [f"t{i}" for i in range(5)]


def test_a_train_log_keeps_the_bar_as_one_final_line_and_the_loss_lines(model_dir, tmp_path, capsys):
    samples = Path(__file__).resolve().parents[1] / "src" / "mechsieve" / "data" / "samples"
    out = tmp_path / "run"
    assert main(["train", "--model", str(model_dir), "--data", str(samples / "gsm8k_train.jsonl"), "--limit", "3",
                 "--steps", "3", "--logging-steps", "1", "--set", "train.lora_r=2", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert err.count("\r") >= 3  # the terminal got the bar's redraws
    text = (out / "log.txt").read_text()
    assert "\r" not in text and "\x1b" not in text
    bars = [ln for ln in text.splitlines() if ln.startswith("train:")]
    assert len(bars) == 1 and "100%" in bars[0] and "3/3" in bars[0]
    assert [ln.split()[2] for ln in text.splitlines() if ln.startswith("mechsieve.train: step")] == \
        ["1/3", "2/3", "3/3"]
