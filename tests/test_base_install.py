"""The console script on a base install (``pip install streamattn``: torch and rich, no extra).

A fresh interpreter gets an import hook first (a ``sys.meta_path`` finder) that makes every module of
the ``hf`` and ``dev`` extras (and what they pull in) fail to import with the error of a module that
is not installed; then it runs the CLI.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

BLOCKED = (
    "transformers",
    "matplotlib",
    "psutil",
    "accelerate",
    "gguf",
    "tokenizers",
    "safetensors",
    "huggingface_hub",
    "numpy",  # torch does not require it
    "fastapi",  # the serve extra
    "uvicorn",
    "prometheus_client",
    "starlette",
    "pydantic",
)

SCRIPT = textwrap.dedent(
    """
    import contextlib, io, json, sys

    BLOCKED = set(sys.argv[1].split(","))


    class NotInstalled:
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in BLOCKED:
                # what Python raises for a module that is not installed (an ImportError)
                raise ModuleNotFoundError(f"No module named {name!r} (not in the base install)", name=name)
            return None


    sys.meta_path.insert(0, NotInstalled())
    try:
        import transformers  # noqa: F401
        hook_works = False
    except ModuleNotFoundError:
        hook_works = True

    from streamattn.cli import main

    results = {}
    for key, argv in json.loads(sys.argv[2]).items():
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main(argv)
            except SystemExit as exc:  # argparse's --help
                rc = exc.code
        results[key] = {"rc": rc, "out": out.getvalue(), "err": err.getvalue()}
    loaded = sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)
    print(json.dumps({"hook_works": hook_works, "loaded": loaded, "results": results}))
    """
)

CALLS = {
    "help": ["--help"],
    "engine-demo --help": ["engine-demo", "--help"],
    "engine-demo": ["engine-demo", "--tokens", "400", "--chunk", "100", "--decode", "20", "--window", "64"],
    "stream": ["stream"],
    "chat": ["chat"],
    "generate": ["generate", "Once upon a time"],
    "serve": ["serve"],
}


@pytest.fixture(scope="module")
def base_install():
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, ",".join(BLOCKED), json.dumps(CALLS)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_hook_really_hides_the_extras_and_nothing_loads_them(base_install):
    assert base_install["hook_works"]
    assert base_install["loaded"] == []


def test_help_lists_every_command(base_install):
    help_ = base_install["results"]["help"]
    assert help_["rc"] == 0
    for command in ("stream", "chat", "generate", "engine-demo", "serve"):
        assert command in help_["out"]


def test_engine_demo_runs(base_install):
    assert base_install["results"]["engine-demo --help"]["rc"] == 0
    demo = base_install["results"]["engine-demo"]
    assert demo["rc"] == 0, demo["err"]
    assert "OK" in demo["out"] and "same buffers since the first call" in demo["out"]


@pytest.mark.parametrize("command", ["stream", "chat", "generate"])
def test_llm_commands_say_which_extra_to_install(base_install, command):
    result = base_install["results"][command]
    assert result["rc"] == 2 and result["out"] == ""
    lines = result["err"].strip().splitlines()
    assert len(lines) == 1, result["err"]
    assert lines[0].startswith(f"streamattn {command}: error: this command needs the 'hf' extra")
    assert "pip install 'streamattn[hf]'" in lines[0] and "transformers" in lines[0]


def test_serve_says_which_extras_to_install(base_install):
    result = base_install["results"]["serve"]
    assert result["rc"] == 2 and result["out"] == ""
    line = result["err"].strip()
    assert line.startswith("streamattn serve: error: this command needs the 'hf' and 'serve' extras")
    assert "pip install 'streamattn[hf,serve]'" in line and "fastapi" in line
