"""The docs name only commands, flags and links that exist (README.md and docs/*.md).

Every program a reader is told to run is asked for its flags the way a reader would: each
`launchers/*.py` and each `scripts/*.py` that takes flags is run once with `--help` (all of them
parse their flags before importing anything heavy: no Ray, no model, no vLLM or gptqmodel import,
so `scripts/quantize.py --help` works in the main environment too). Then, in every doc:

- a command line in a code block (`python launchers/X.py ...`, `.venv-quant/bin/python
  scripts/X.py ...`, `bash scripts/X.sh ...`; `\\` continuations joined) names a file that exists,
  and each `--flag` after the program is one of that program's flags (for a .sh script, the flags
  of the program it passes its arguments to);
- the same holds for a program named with flags in prose (`launchers/serve.py --quant 4bit`);
- every other `--flag` in prose, tables or code comments is a flag of at least one of our
  programs, or of another program on the small, explicit ALLOWED list below;
- relative links point at files and headings that exist.

Failures name the doc, the line and the flag.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 220

# Our programs with flags: every launcher, and the scripts that parse flags.
PROGRAMS = sorted(
    [f"launchers/{p.name}" for p in (ROOT / "launchers").glob("*.py")]
    + [f"scripts/{p.name}" for p in (ROOT / "scripts").glob("*.py")
       if "add_argument(" in p.read_text() or "from coati_ray.cli import parse" in p.read_text()])

# Where a shell script's own arguments go ("$@"): a program of ours, or pytest. A script not listed
# here takes no flags (setup*.sh take extras, as positional words).
SH_ARGS_GO_TO = {
    "scripts/demo.sh": "launchers/demo.py",
    "scripts/test.sh": "pytest",
    "scripts/test_engines.sh": "pytest",
    "scripts/gpu_check.sh": "pytest",
}

# Flags of other programs that the docs name in prose (flags in a code-block line of another
# program, e.g. `ray start --head`, are not checked). Keep this as small as the docs allow.
ALLOWED = {
    "--dashboard-host": "ray start (cluster.yaml starts the head with --dashboard-host=127.0.0.1)",
    "--head": "ray start --head",
    "--resources": "ray start --resources='{\"rollout\": 1}' (cluster-local.yaml's markers)",
    "--generate": "ray get-auth-token --generate",
    "--tmux": "ray exec / ray attach --tmux",
    "--logdir": "tensorboard --logdir",
    "--backend-store-uri": "mlflow ui --backend-store-uri (docs/stages.md, experiment tracking)",
    # ray start's port flags, in docs/cluster.md's table of what a cluster opens
    "--object-manager-port": "ray start", "--node-manager-port": "ray start",
    "--min": "ray start --min/max-worker-port", "--dashboard-agent-grpc-port": "ray start",
    "--dashboard-agent-listen-port": "ray start", "--runtime-env-agent-port": "ray start",
    "--metrics-export-port": "ray start",
}

PROGRAM_RE = re.compile(r"(?<![\w./-])((?:launchers|scripts)/[\w-]+\.(?:py|sh))\b")
FLAG_RE = re.compile(r"(?<![\w-])--[A-Za-z][\w-]*")
SEPARATOR_RE = re.compile(r"&&|;|\s\|\s")  # ends a program's arguments on a shell line
FENCE_RE = re.compile(r"^\s*(```|~~~)")
LINK_RE = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
SPAN_RE = re.compile(r"`([^`]+)`")


# ---------------------------------------------------------------- the programs' flags, once


@dataclass
class Help:
    rc: int
    output: str
    flags: frozenset[str]


def usage_flags(text: str) -> frozenset[str]:
    """The option strings argparse prints: its usage block (each argument's first name), the aliases in its
    options list, and --help."""
    m = re.search(r"^usage:.*?(?=^\s*$)", text, re.MULTILINE | re.DOTALL)
    if not m:
        return frozenset()
    flags = {f.rstrip("-") for f in FLAG_RE.findall(m.group(0))}
    first = set(flags)
    for line in text[m.end():].splitlines():  # aliases: "  --orpo_lambda X, --lambda X   help text"
        if line.lstrip().startswith("--"):  # (not HfArgumentParser's --dashed-copy of each --flag_name)
            flags |= {f for f in FLAG_RE.findall(re.split(r"\s{2,}", line.strip())[0])
                      if f.replace("-", "_").replace("__", "--", 1) not in first}
    if re.search(r"\[-h\]", m.group(0)):
        flags.add("--help")
    return frozenset(flags)


def run_help(program: str) -> Help:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    try:
        p = subprocess.run([sys.executable, program, "--help"], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=120, check=False)
    except subprocess.TimeoutExpired as e:
        return Help(-1, f"timed out after {e.timeout} s", frozenset())
    out = p.stdout + p.stderr
    return Help(p.returncode, out, usage_flags(p.stdout) if p.returncode == 0 else frozenset())


@pytest.fixture(scope="module")
def helps() -> dict[str, Help]:
    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(PROGRAMS, pool.map(run_help, PROGRAMS)))


# ---------------------------------------------------------------- reading the docs


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def code_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, logical line) of every fenced code block, `\\` continuations joined."""
    out, inside, pending, start = [], False, "", 0
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if FENCE_RE.match(line):
            inside = not inside
            continue
        if not inside:
            continue
        if not pending:
            start = n
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append((start, pending + line))
        pending = ""
    return out


def prose(path: Path) -> str:
    """The doc with its code blocks blanked out (line numbers kept)."""
    lines, inside = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        fence = bool(FENCE_RE.match(line))
        lines.append("" if inside or fence else line)
        if fence:
            inside = not inside
    return "\n".join(lines)


def split_comment(line: str) -> tuple[str, str]:
    m = re.search(r"(^|\s)#", line)
    return (line, "") if m is None else (line[:m.start()], line[m.start():])


def invocations(text: str):
    """(program, flags after it) for each of our programs named in a piece of shell text."""
    for segment in SEPARATOR_RE.split(text):
        found = list(PROGRAM_RE.finditer(segment))
        for i, m in enumerate(found):
            end = found[i + 1].start() if i + 1 < len(found) else len(segment)
            yield m.group(1), [f.rstrip("-") for f in FLAG_RE.findall(segment[m.end():end])]


def flags_outside_invocations(text: str) -> list[str]:
    """The flags of a piece of text that follow none of our programs."""
    flags = []
    for segment in SEPARATOR_RE.split(text):
        first = PROGRAM_RE.search(segment)
        flags += FLAG_RE.findall(segment if first is None else segment[:first.start()])
    return [f.rstrip("-") for f in flags]


class Checker:
    def __init__(self, helps: dict[str, Help]):
        self.helps = helps
        self.ours = frozenset().union(*(h.flags for h in helps.values()))

    def program_flags(self, program: str, flags: list[str], where: str) -> list[str]:
        """Problems with one invocation of one of our programs."""
        if not (ROOT / program).is_file():
            return [f"{where}: {program} does not exist"]
        target = SH_ARGS_GO_TO.get(program, program)
        if target == "pytest":
            return [f"{where}: {flag} (passed by {program} to pytest) is not in ALLOWED as a pytest option"
                    for flag in flags if not ALLOWED.get(flag, "").startswith("pytest")]
        if target.endswith(".sh"):
            return [f"{where}: {program} takes no flags, got {flag}" for flag in flags]
        h = self.helps.get(target)
        if h is None:
            return [f"{where}: {target} has flags in the docs but no argparse parser here"] if flags else []
        if h.rc != 0:
            return [f"{where}: cannot check {', '.join(flags)}: `{target} --help` failed (rc {h.rc})"] if flags else []
        via = f" (passed on by {program})" if target != program else ""
        return [f"{where}: {flag} is not a flag of {target}{via}" for flag in flags if flag not in h.flags]

    def any_flag(self, flags: list[str], where: str) -> list[str]:
        return [f"{where}: {flag} is a flag of none of launchers/*.py, scripts/*.py, nor in ALLOWED"
                for flag in flags if flag not in self.ours and flag not in ALLOWED]

    def code_blocks(self, path: Path) -> list[str]:
        problems = []
        for n, line in code_lines(path):
            code, comment = split_comment(line)
            for program, flags in invocations(code):
                problems += self.program_flags(program, flags, f"{rel(path)}:{n}")
            problems += self.any_flag(FLAG_RE.findall(comment), f"{rel(path)}:{n} (comment)")
        return problems

    def prose(self, path: Path) -> list[str]:
        text, problems = prose(path), []

        def line_of(pos: int) -> int:
            return text.count("\n", 0, pos) + 1

        for m in SPAN_RE.finditer(text):
            where = f"{rel(path)}:{line_of(m.start())}"
            for program, flags in invocations(m.group(1)):
                problems += self.program_flags(program, flags, where)
            problems += self.any_flag(flags_outside_invocations(m.group(1)), where)
        outside = SPAN_RE.sub(lambda m: " " * len(m.group(0).replace("\n", "")) + "\n" * m.group(0).count("\n"), text)
        for m in FLAG_RE.finditer(outside):
            problems += self.any_flag([m.group(0).rstrip("-")], f"{rel(path)}:{line_of(m.start())}")
        return problems


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    s = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return s.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*$", prose(path), re.MULTILINE)}


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("program", PROGRAMS)
def test_help_runs_and_lists_flags(helps, program):
    h = helps[program]
    assert h.rc == 0, f"`python {program} --help` exited {h.rc}:\n{h.output[-2000:]}"
    assert "--help" in h.flags and len(h.flags) > 1, f"no flags found in the usage of {program}:\n{h.output[:2000]}"


def test_shell_scripts_pass_their_arguments_where_the_test_assumes():
    for script, target in SH_ARGS_GO_TO.items():
        text = (ROOT / script).read_text()
        assert '"$@"' in text, f"{script} no longer passes its arguments on; update SH_ARGS_GO_TO"
        expected = "pytest" if target == "pytest" else f'{target} "$@"'
        assert expected in text, f"{script} no longer passes its arguments to {target}; update SH_ARGS_GO_TO"


@pytest.mark.parametrize("doc", DOCS, ids=rel)
def test_command_lines_in_code_blocks_name_real_programs_and_flags(helps, doc):
    problems = Checker(helps).code_blocks(doc)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("doc", DOCS, ids=rel)
def test_flags_in_prose_and_tables_exist(helps, doc):
    problems = Checker(helps).prose(doc)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("doc", DOCS, ids=rel)
def test_relative_links_resolve(doc):
    text, problems = prose(doc), []
    for m in LINK_RE.finditer(text):
        target = m.group(1)
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        where = f"{rel(doc)}:{text.count(chr(10), 0, m.start()) + 1}"
        file, _, anchor = target.partition("#")
        dest = (doc.parent / file).resolve() if file else doc
        if doc.parent.name == "docs" and file.endswith(".md") and not file.startswith(("./", "../")):
            problems.append(f"{where}: link {target!r} between docs pages should read ./{file}")
        if not dest.exists():
            problems.append(f"{where}: link {target!r}: {file} does not exist")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{where}: link {target!r}: no heading #{anchor} in {rel(dest)}")
    assert not problems, "\n".join(problems)


def test_allowed_flags_are_needed_and_not_ours(helps):
    """Each ALLOWED flag appears in the docs and is none of our programs' flags."""
    text = "\n".join(d.read_text(encoding="utf-8") for d in DOCS)
    ours = Checker(helps).ours
    for flag, program in ALLOWED.items():
        assert re.search(re.escape(flag) + r"(?![\w-])", text), f"ALLOWED {flag} ({program}) is in no doc: drop it"
        assert flag not in ours, f"ALLOWED {flag} ({program}) is a flag of our own programs: drop it"


def test_readme_fits_the_front_page():
    n = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines; move detail to docs/ (at most {README_MAX_LINES})"
