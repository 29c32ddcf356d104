"""`python -m musetalk_adapter run [--gfpgan-...] -- scripts/inference.py [MuseTalk's args]`:
hooks MuseTalk's VAE.decode_latents, then runs MuseTalk's own script unchanged.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import runpy
import sys
import tempfile

from musetalk_adapter.config import (
    YAML_SECTION,
    GFPGANSettings,
    SettingsError,
    add_arguments,
    from_args,
    load_yaml,
    resolve,
)

USAGE = ("python -m musetalk_adapter run [--gfpgan-address HOST:PORT] [--gfpgan-...] -- "
         "SCRIPT.py|-m MODULE [MuseTalk's own arguments]")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m musetalk_adapter", usage=USAGE, allow_abbrev=False,
        description="Run a MuseTalk script (scripts/inference.py, scripts/realtime_inference.py, "
                    "app.py) unchanged, with every decoded face batch enhanced by the "
                    "gfpgan-service. Settings: defaults < the 'gfpgan:' section of the "
                    "--inference_config YAML < flags (before or after --).")
    parser.add_argument("command", choices=["run"], help="run a MuseTalk script")
    parser.add_argument("--summary-json", default=None,
                        help="also write the end-of-run summary to this JSON file")
    return add_arguments(parser)


def _split(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" not in argv:
        raise SettingsError(f"put -- before MuseTalk's script and its arguments; usage: {USAGE}")
    at = argv.index("--")
    return argv[:at], argv[at + 1:]


def _pop_gfpgan_flags(script_args: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """--gfpgan_* / --enable_gfpgan among MuseTalk's arguments are ours: MuseTalk's parser
    would refuse them. Everything else passes through untouched, in order."""
    parser = add_arguments(argparse.ArgumentParser(add_help=False, allow_abbrev=False))
    ours, rest = parser.parse_known_args(script_args)
    return ours, rest


#: MuseTalk's scripts that read --inference_config, and the file each reads when it is not
#: given (scripts/inference.py:259, scripts/realtime_inference.py:324 at 0a89dec).
DEFAULT_CONFIGS = {
    "scripts.inference": "configs/inference/test_img.yaml",
    "scripts.realtime_inference": "configs/inference/realtime.yaml",
}
CONFIG_FLAG = "--inference_config"
#: MuseTalk's parsers allow abbreviations, and no other option of theirs starts with "--i":
#: every prefix from "--i" up names --inference_config there, so it does here.
_SHORTEST_CONFIG_PREFIX = 3


def _module_name(head: list[str]) -> str:
    """"scripts.inference" from ["-m", "scripts.inference"], "scripts/inference.py" or
    "scripts\\inference.py"."""
    if head[0] == "-m":
        return head[1]
    parts = [p for p in re.split(r"[\\/]", head[0]) if p not in ("", ".")]
    parts[-1] = parts[-1].removesuffix(".py")
    return ".".join(parts[-2:])


def _is_config_flag(arg: str) -> bool:
    name = arg.split("=", 1)[0]
    return len(name) >= _SHORTEST_CONFIG_PREFIX and CONFIG_FLAG.startswith(name)


def _config_path(script_args: list[str]) -> tuple[int | None, str | None]:
    """Where --inference_config's value is in MuseTalk's arguments (also abbreviated, as
    MuseTalk's argparse accepts it; the last one given wins, as there), and the value."""
    found: tuple[int | None, str | None] = (None, None)
    i = 0
    while i < len(script_args):
        arg = script_args[i]
        if arg == "--":
            break
        if _is_config_flag(arg):
            if "=" in arg:
                found = (i, arg.split("=", 1)[1])
            elif i + 1 < len(script_args):
                found = (i + 1, script_args[i + 1])
                i += 1
        i += 1
    return found


def prepare(argv: list[str]) -> tuple[GFPGANSettings, list[str], argparse.Namespace, str | None]:
    """Settings and MuseTalk's argv (a `gfpgan:`-free copy of its YAML swapped in, since
    MuseTalk reads every top-level key as a task); raises SettingsError before anything runs."""
    ours, script_argv = _split(argv)
    launcher = _parser().parse_args(ours)
    if not script_argv:
        raise SettingsError(f"no MuseTalk script after --; usage: {USAGE}")
    if script_argv[0] == "-m":
        head, script_args = script_argv[:2], script_argv[2:]
        if len(head) < 2:
            raise SettingsError("-m needs a module name, e.g. -m scripts.inference")
    else:
        head, script_args = script_argv[:1], script_argv[1:]
        if not os.path.isfile(head[0]):
            raise SettingsError(f"MuseTalk script {head[0]} not found (the current folder is "
                                f"{os.getcwd()}; run from MuseTalk's root folder)")
    inline, script_args = _pop_gfpgan_flags(script_args)
    index, path = _config_path(script_args)
    default = DEFAULT_CONFIGS.get(_module_name(head))
    if path is None and default is not None and os.path.isfile(default):
        # MuseTalk reads its default config then: so does the launcher, and strips it too.
        script_args = [*script_args, CONFIG_FLAG, default]
        index, path = len(script_args) - 1, default
    document = load_yaml(path) if path else None
    # The launcher is how GFPGAN gets turned on: enabled unless the YAML or a flag says not.
    settings = from_args(inline, from_args(launcher, resolve(document, base=GFPGANSettings(enabled=True))))
    settings = settings.check()
    stripped = None
    if isinstance(document, dict) and YAML_SECTION in document:
        stripped = _without_section(document)
        script_args = list(script_args)
        flag, sep, _ = script_args[index].partition("=")
        script_args[index] = f"{flag}={stripped}" if sep and _is_config_flag(flag) else stripped
    return settings, head + script_args, launcher, stripped


def _without_section(document: dict) -> str:
    import yaml

    rest = {key: value for key, value in document.items() if key != YAML_SECTION}
    handle = tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="musetalk_config_",
                                         delete=False, encoding="utf-8")
    with handle:
        yaml.safe_dump(rest, handle, sort_keys=False, allow_unicode=True)
    return handle.name


def run_script(script_argv: list[str]) -> None:
    """Run MuseTalk's script as `python SCRIPT ...` or `python -m MODULE ...` would."""
    if script_argv[0] == "-m":
        sys.argv = [script_argv[1], *script_argv[2:]]
        runpy.run_module(script_argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(script_argv)
        sys.path.insert(0, os.path.dirname(os.path.abspath(script_argv[0])))
        runpy.run_path(script_argv[0], run_name="__main__")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help") or argv[:2] in (["run", "-h"], ["run", "--help"]):
        _parser().print_help()
        return 0
    try:
        settings, script_argv, launcher, stripped = prepare(argv)
    except SettingsError as error:
        print(f"musetalk_adapter: error: {error}", file=sys.stderr)
        return 2
    try:
        return _run(settings, script_argv, launcher)
    finally:
        if stripped:  # the launcher's copy of the YAML, whether MuseTalk ran or the launcher refused
            os.unlink(stripped)


def _run(settings: GFPGANSettings, script_argv: list[str], launcher: argparse.Namespace) -> int:
    from musetalk_adapter.enhancer import GFPGANEnhancer
    from musetalk_adapter.hook import install

    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # MuseTalk imports `musetalk.*` from its root folder
    try:
        enhancer = GFPGANEnhancer(settings)
    except SettingsError as error:  # the service serves another model than the settings name
        print(f"musetalk_adapter: error: {error}", file=sys.stderr)
        return 2
    for note in enhancer.notes:
        print(f"musetalk_adapter: GFPGAN: {note}", file=sys.stderr)
    try:
        uninstall = install(enhancer) if settings.enabled else None
    except ImportError as error:
        enhancer.close()
        print(f"musetalk_adapter: error: {error}", file=sys.stderr)
        return 2
    code = 0
    try:
        run_script(script_argv)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        if uninstall is not None:
            uninstall()
        summary = enhancer.close()
        if settings.enabled:
            print(summary, file=sys.stderr)
            if launcher.summary_json:
                with open(launcher.summary_json, "w", encoding="utf-8") as handle:
                    json.dump(summary.as_dict(), handle)
    return code


if __name__ == "__main__":
    sys.exit(main())
