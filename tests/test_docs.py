"""The README's front page: every path it names exists, every command in it runs (the training commands as dry
runs, the converters' command lines parsed by their own argument parsers), and every docs link resolves."""
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / 'README.md').read_text()
# Paths a user creates (their data, runs, exports) or that a cluster supplies.
USER_PATHS = ('my_', 'data/', 'outputs/', 'exports/', 's3://')
HUB_NAMES = ('stabilityai/',)  # models loaded by name from the model hub


def _exists(name: str) -> bool:
    """A repository path, a recipe named from yamls/ (with or without .yaml), or a file named by itself."""
    if (REPO / name).exists() or any((REPO / 'yamls' / f).exists() for f in (name, f'{name}.yaml')):
        return True
    tracked = subprocess.run(['git', 'ls-files'], cwd=REPO, capture_output=True, text=True).stdout.split()
    return '/' not in name and any(Path(f).name == name for f in tracked)


def _commands() -> list[list[str]]:
    """Every command of the README's bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r'```bash\n(.*?)```', README, flags=re.S):
        text = re.sub(r'\\\n\s*', ' ', block)
        for line in text.splitlines():
            line = line.split('  #')[0].strip()
            if line and not line.startswith('#'):
                commands.append(shlex.split(line))
    return commands


def _repo_paths() -> set[str]:
    named = set(re.findall(r'`([\w./-]+/[\w./-]*|[\w-]+\.(?:py|yaml|md))`', README))
    named |= {m for m in re.findall(r'\]\(([^)#]+)\)', README) if '://' not in m}
    for command in _commands():
        named |= {w for w in command if re.match(r'^[\w.-]+/[\w./-]+$', w) or w.endswith(('.py', '.yaml'))}
    return {p for p in named if not p.startswith(USER_PATHS + HUB_NAMES) and '=' not in p}


def test_every_path_the_readme_names_exists():
    paths = _repo_paths()
    assert 'yamls/sd2-base-cc.yaml' in paths and 'docs/training.md' in paths  # the parser sees them
    missing = sorted(p for p in paths if not _exists(p))
    assert not missing, f'README names paths that do not exist: {missing}'


def test_the_front_page_stays_a_front_page():
    assert len(README.splitlines()) <= 250


def _entry(command: list[str]) -> tuple[str, list[str]]:
    """(script, arguments) of a python / composer command line."""
    args = command[1:]
    if args[:1] == ['-m']:  # python -m package.module: the module stands for the script
        return f'-m {args[1]}', args[2:]
    while args and args[0].startswith('-'):  # composer's own flags (-n 8)
        args = args[2:]
    return args[0], args[1:]


def test_every_command_runs_or_dry_runs(capsys):
    from diffusion.training.train import main
    commands = _commands()
    kinds = set()
    for command in commands:
        tool = command[0]
        if tool == 'make':
            makefile = (REPO / 'Makefile').read_text()
            assert re.search(rf'^{command[1]}:', makefile, flags=re.M), command
            kinds.add('make')
        elif tool in ('sbatch', 'mcli'):
            assert any((REPO / w).exists() for w in command if w.endswith(('.sbatch', '.yaml'))), command
            kinds.add('launcher')
        elif tool in ('python', 'composer'):
            script, args = _entry(command)
            if script == 'run.py':  # training: as a dry run on the meta device
                overrides = [a for a in args[1:] if not a.startswith('dry_run=')]
                assert main([args[0], *overrides, 'dry_run=true']) == 0, command
                assert 'WARNING' not in capsys.readouterr().out, command
                kinds.add('train')
            else:  # a converter or a module's CLI: its own parser accepts the command line as written
                probe = ('import runpy, sys; sys.argv = sys.argv[1:]; import argparse\n'
                         'def parse(self, args=None, namespace=None):\n'
                         '    ns, rest = self.parse_known_args(args, namespace)\n'
                         '    assert not rest, rest\n'
                         '    raise SystemExit(0)\n'
                         'argparse.ArgumentParser.parse_args = parse\n'
                         'if sys.argv[0].startswith("-m "):\n'
                         '    sys.argv[0] = sys.argv[0][3:]\n'
                         '    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)\n'
                         'else:\n'
                         '    runpy.run_path(sys.argv[0], run_name="__main__")')
                done = subprocess.run([sys.executable, '-c', probe, script, *args], cwd=REPO, capture_output=True,
                                      text=True, timeout=300)
                assert done.returncode == 0, (command, done.stderr[-2000:])
                kinds.add('convert')
        else:
            pytest.fail(f'README command of an unknown kind: {command}')
    assert kinds >= {'make', 'train', 'convert'}
