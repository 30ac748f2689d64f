"""``import quasistatic`` leaves its host alone (a notebook, a GUI, another library's process): no
matplotlib backend chosen, no torch thread count or default dtype changed, no warning at import;
the plots still write PNGs headless without pyplot. Each check runs in a fresh interpreter."""

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import quasistatic
from quasistatic.cli import main

ROOT = Path(quasistatic.__file__).resolve().parents[1]  # the checkout under test, first on the child's path


def run_python(code: str, *options: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    env.pop("MPLBACKEND", None)
    return subprocess.run([sys.executable, *options, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300, env=env, cwd=ROOT)


def test_import_is_clean_with_warnings_as_errors():
    result = run_python("import quasistatic", "-W", "error")
    assert result.returncode == 0, result.stderr
    assert result.stderr == "" and result.stdout == ""


@pytest.mark.parametrize("backend", ["svg", "pdf"])
def test_import_keeps_the_hosts_backend_threads_and_dtype(backend):
    result = run_python(f"""
        import matplotlib
        matplotlib.use({backend!r})
        import torch
        torch.set_num_threads(3)
        torch.set_default_dtype(torch.float64)
        import sys
        import warnings
        callers = []  # the modules that set a warning filter (numpy, scipy and torch set some at import)
        for name in ("filterwarnings", "simplefilter"):
            def record(*args, _original=getattr(warnings, name), **kwargs):
                callers.append(sys._getframe(1).f_globals.get("__name__", ""))
                return _original(*args, **kwargs)
            setattr(warnings, name, record)
        import logging
        handlers = list(logging.getLogger().handlers)

        import quasistatic
        import quasistatic.cli
        import quasistatic.experiments.plots
        import quasistatic.experiments.transfer

        assert matplotlib.get_backend() == {backend!r}, matplotlib.get_backend()
        assert torch.get_num_threads() == 3, torch.get_num_threads()
        assert torch.get_default_dtype() == torch.float64, torch.get_default_dtype()
        assert not [c for c in callers if c.startswith("quasistatic")], callers
        assert logging.getLogger().handlers == handlers, logging.getLogger().handlers
        """)
    assert result.returncode == 0, result.stderr


def test_plots_write_pngs_without_pyplot(tmp_path):
    result = run_python(f"""
        import sys
        from pathlib import Path

        import matplotlib
        matplotlib.use("svg")
        from quasistatic.experiments.plots import plot_columns, plot_hysteresis

        rows = [{{"step": i, "R": 1.0 / (i + 1), "D": float(i), "grad_norm": 10.0 ** -i}} for i in range(4)]
        out = Path({str(tmp_path)!r})
        plot_columns(rows, "step", [("R", "D"), ("grad_norm",)], out / "columns.png", title="columns")
        loop = [{{"D": float(i), "R": 1.0 - i, "lam": 1.0 + i, "gamma": 2.0, "lambda_min": 0.1 * i,
                  "event": "jump" if i == 2 else ""}} for i in range(4)]
        plot_hysteresis([("forward", loop), ("return", loop[::-1])], out / "loop.png", title="loop")
        assert "matplotlib.pyplot" not in sys.modules
        assert matplotlib.get_backend() == "svg", matplotlib.get_backend()
        """)
    assert result.returncode == 0, result.stderr
    for name in ("columns.png", "loop.png"):
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_the_cli_shows_the_library_log_on_stderr_and_restores_the_logger(tmp_path, capsys, monkeypatch):
    """The command line shows the library's INFO messages on stderr while it runs and undoes its
    logging set-up (and its thread count) on return."""
    import torch

    from quasistatic.cli import equilibrate_command

    def command(args, group):
        logging.getLogger("quasistatic.experiments.trajectory").info("jumped to s=%.6g", 0.5)
        logging.getLogger("quasistatic.experiments.trajectory").debug("not shown")
        return 0

    monkeypatch.setattr(equilibrate_command, "run", command)
    package = logging.getLogger("quasistatic")
    level, handlers, threads = package.level, list(package.handlers), torch.get_num_threads()
    assert main(["--threads", "2", "equilibrate", "--out", str(tmp_path / "run")]) == 0
    assert package.level == level and package.handlers == handlers and torch.get_num_threads() == threads
    captured = capsys.readouterr()
    assert captured.err == "jumped to s=0.5\n" and captured.out == ""
