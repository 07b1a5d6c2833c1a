"""A fuzzer of the `bprun` command line: every mistake ends in one `error:` line, or in a run.

Each case is a command line: an option of each of a few groups (every option of every
group is drawn), and one leaf key of the composed config (`bprun --cfg job`) set to a bad
value (0, -1, a huge number, a wrong type, an empty list, a list one item short or long, a
string, a path that does not exist) or spelt with a typo (a letter dropped, doubled or
swapped, in any part of the dotted name). The real command runs it, and must end

    exit 0 with a complete run folder (metrics.json, status completed), or
    exit 1 with an `error:` line, no traceback, and no run folder left behind (unless
    training started and failed, which metrics.json records: a loss that became NaN).

Cases run in processes forked from one that has imported bprun, torch and Hydra already
(`bprun.cli.main()` in the child, as the console script calls it), with
`trainer.fast_dev_run=true`, one thread and a memory limit; that is the command without
its imports, at a tenth of its start-up.

    python tests/fuzz.py --n 2000 --seed 1      # `make fuzz N=2000 SEED=1`
    python tests/fuzz.py --corpus               # replay tests/fuzz_corpus.txt

A failing case is printed shrunk to its smallest form (overrides removed one at a time
while it still fails the same way); add it to tests/fuzz_corpus.txt once fixed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = Path(__file__).with_name("fuzz_corpus.txt")

# Datasets that download (no network in a fuzz run) are left out, with the groups that only
# name experiments or sweepers; keys the harness sets, and keys whose good values are slow
# (torch.compile, ranks), are not drawn.
SKIP_OPTIONS = {
    "dataset": {"mnist", "fashion_mnist", "kmnist", "cifar10", "cifar100"},
    "model": {"timm", "torchvision"},
}
SKIP_GROUPS = {"experiment", "search", "hydra", "loading"}
HARNESS = ["trainer.fast_dev_run=true", "trainer.threads=1", "trainer.progress=false"]
SKIP_KEYS = {
    "trainer.fast_dev_run",
    "trainer.threads",
    "trainer.progress",
    "trainer.devices",
    "trainer.compile",
    "paths.data_dir",
    "dataset.data_dir",
    "dataset.num_workers",
}
# Settings of other tasks (meta runs 70000 iterations, attack is task=eval's) and of sweeps.
SKIP_PREFIXES = ("search.", "hydra.", "meta.", "gradcheck.", "lr_find.", "attack.")
# The parts of a run: most cases set a key of one of these (or of a group the case picks).
PARTS = ("dataset", "model", "problem", "loss", "optim", "sched")
HUGE = 2**31
TIMEOUT_S = 120
MEMORY_LIMIT = 6 * 2**30  # on top of what the parent maps: a huge width fails to allocate


@dataclass
class Case:
    overrides: list[str]

    @property
    def line(self) -> str:
        return "bprun " + " ".join(shlex.quote(o) for o in self.overrides)


@dataclass
class Outcome:
    code: int
    output: str
    folder_left: bool
    complete: bool
    seconds: float
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def kind(self) -> str:
        return self.problems[0].split(":")[0] if self.problems else "ok"


# ----------------------------------------------------------------------------- the runner


def prepare() -> None:
    """Import what every case needs once, in the process cases are forked from: what the
    tests' fork server imports (tests/forkserver.py)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.path.insert(0, str(Path(__file__).parent))
    from forkserver import prepare as imports

    imports()


def run_case(case: Case, workdir: Path, data_dir: Path, timeout: float = TIMEOUT_S) -> Outcome:
    """Run `bprun <overrides>` in a forked child; judge how it ended."""
    workdir.mkdir(parents=True, exist_ok=True)
    run_dir = workdir / "run"
    log = workdir / "output.txt"
    argv = [
        *HARNESS,
        f"paths.data_dir={data_dir}",
        f"hydra.run.dir={run_dir}",
        *case.overrides,
    ]
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the child: the command, as the console script runs it
        code = 70
        try:
            import resource

            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            # and Python's streams onto them (pytest's capture may have replaced sys.stdout)
            sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
            sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
            os.chdir(workdir)
            soft, hard = resource.getrlimit(resource.RLIMIT_AS)
            mapped = _mapped_bytes()
            resource.setrlimit(resource.RLIMIT_AS, (mapped + MEMORY_LIMIT, hard))
            sys.argv = ["bprun", *argv]
            from bprun.cli import main

            try:
                main()
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 70
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    code = _wait(pid, timeout)
    seconds = time.monotonic() - started
    output = log.read_text(errors="replace") if log.exists() else ""
    return judge(code, output, run_dir, seconds)


def _mapped_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def _wait(pid: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return -999
        time.sleep(0.02)


def judge(code: int, output: str, run_dir: Path, seconds: float) -> Outcome:
    folder_left = run_dir.exists()
    metrics = run_dir / "metrics.json"
    complete = False
    if metrics.is_file():
        try:
            complete = json.loads(metrics.read_text()).get("status") == "completed"
        except ValueError:
            complete = False
    problems = []
    if "Traceback (most recent call last)" in output or "stack trace" in output:
        problems.append("traceback: " + _last_line(output))
    if code == -999:
        problems.append(f"hang: no end within {TIMEOUT_S} s")
    elif code == 0:
        if not complete:
            problems.append("incomplete: exit 0 without a completed metrics.json")
    elif code == 1:
        if not any(line.startswith("error: ") for line in output.splitlines()):
            problems.append("no error line: exit 1 without an `error:` line")
        if folder_left and not _recorded_failure(metrics):
            problems.append(f"folder left: exit 1 left {run_dir}")
    else:
        problems.append(f"exit {code}: " + _last_line(output))
    return Outcome(code, output, folder_left, complete, seconds, problems)


def _recorded_failure(metrics: Path) -> bool:
    """A run that trained and then failed (a loss that became NaN at lr=1e30) keeps its folder,
    with metrics.json saying so: an outcome of training, not a command line refused."""
    try:
        return json.loads(metrics.read_text()).get("status") == "failed"
    except (OSError, ValueError):
        return False


def _last_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1][:200] if lines else ""


# ----------------------------------------------------------------------------- the cases


def group_options() -> dict[str, list[str]]:
    """Every option of every config group a run picks (bprun --help lists them)."""
    from bprun.help import config_folders, groups

    found = groups(config_folders([]))
    return {
        g: sorted(o for o in options if o not in SKIP_OPTIONS.get(g, ()))
        for g, options in sorted(found.items())
        if g not in SKIP_GROUPS and "/" not in g and options
    }


_LEAVES: dict[tuple[str, ...], list[tuple[str, object]]] = {}


def leaves(base: list[str]) -> list[tuple[str, object]]:
    """(dotted key, value) of every leaf of the composed config (`bprun --cfg job`)."""
    key = tuple(base)
    if key not in _LEAVES:
        from omegaconf import OmegaConf

        from bprun.checks import compose

        try:
            cfg = OmegaConf.to_container(compose(list(base)), resolve=False)
        except Exception:
            cfg = {}
        found: list[tuple[str, object]] = []

        def walk(value, path):
            if isinstance(value, dict) and value:
                for k, v in value.items():
                    walk(v, f"{path}.{k}" if path else str(k))
            else:
                found.append((path, value))

        walk(cfg, "")
        _LEAVES[key] = [
            (k, v)
            for k, v in found
            if k not in SKIP_KEYS
            and not k.startswith(SKIP_PREFIXES)
            and not k.endswith("_partial_")
        ]
    return _LEAVES[key]


def bad_values(value, rng: random.Random) -> list[str]:
    """The wrong values to try for a key whose good value is `value`."""
    out = ["0", "-1", str(HUGE), "abc", "[]", "/no/such/path", "null"]
    if isinstance(value, bool):
        out += ["2", "[true]"]
    elif isinstance(value, int):
        out += ["1.5", "[1,2]", str(-HUGE)]
    elif isinstance(value, float):
        out += ["-0.5", "1e30", "nan", "inf", "[0.1]"]
    elif isinstance(value, list):
        items = [json.dumps(v) if not isinstance(v, str) else v for v in value]
        if items:
            out += [f"[{','.join(items[:-1])}]", f"[{','.join(items + items[-1:])}]"]
            out += [f"[{','.join(['0'] * len(items))}]", f"[{','.join(['-1'] * len(items))}]"]
            out += [f"[{','.join(['abc'] * len(items))}]"]
        out += ["3"]
    elif isinstance(value, str):
        out += ["''", "1", "a/b"]
    return out


def typo(key: str, rng: random.Random) -> str:
    """A letter dropped, doubled or swapped in one part of the dotted key."""
    parts = key.split(".")
    i = rng.randrange(len(parts))
    word = parts[i]
    if len(word) < 2:
        return key
    j = rng.randrange(len(word) - 1)
    how = rng.choice(("drop", "double", "swap"))
    if how == "drop":
        word = word[:j] + word[j + 1 :]
    elif how == "double":
        word = word[: j + 1] + word[j] + word[j + 1 :]
    else:
        word = word[:j] + word[j + 1] + word[j] + word[j + 2 :]
    parts[i] = word
    return ".".join(parts)


def draw(rng: random.Random, options: dict[str, list[str]]) -> Case:
    """One case: an option of one or two groups, and one key set to a bad value or misspelt."""
    base = []
    for group in rng.sample(sorted(options), k=rng.choice((1, 1, 2))):
        base.append(f"{group}={rng.choice(options[group])}")
    keys = leaves(base)
    if not keys:
        return Case(base)
    picked = {o.split("=", 1)[0] for o in base}
    near = [kv for kv in keys if kv[0].split(".")[0] in picked or kv[0].split(".")[0] in PARTS]
    key, value = rng.choice(near if near and rng.random() < 0.75 else keys)
    if rng.random() < 0.25:
        good = _format(value)
        return Case([*base, f"{typo(key, rng)}={good}"])
    return Case([*base, f"{key}={rng.choice(bad_values(value, rng))}"])


def _format(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, dict)):
        return json.dumps(value).replace(" ", "").replace('"', "")
    text = str(value)
    return "''" if text == "" else text


def cases(n: int, seed: int, part: tuple[int, int] = (1, 1)) -> list[Case]:
    """Cases `part[0]-1, part[0]-1 + part[1], ...` of `n`: each from its own generator, so a
    share is drawn (and composed) without the others."""
    options = group_options()
    first, parts = part
    return [draw(random.Random(f"{seed}/{i}"), options) for i in range(first - 1, n, parts)]


def read_corpus(path: Path = CORPUS) -> list[Case]:
    """Once-failing command lines, one a line (`bprun` and comments left out)."""
    found = []
    for line in path.read_text().splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        words = shlex.split(line)
        found.append(Case(words[1:] if words[0] == "bprun" else words))
    return found


# ----------------------------------------------------------------------------- shrinking


def shrink(case: Case, first: Outcome, run) -> Case:
    """Drop overrides one at a time while the case still fails the same way."""
    current = list(case.overrides)
    changed = True
    while changed and len(current) > 1:
        changed = False
        for i in range(len(current)):
            trial = current[:i] + current[i + 1 :]
            outcome = run(Case(trial))
            if not outcome.ok and outcome.kind == first.kind:
                current, changed = trial, True
                break
    return Case(current)


# ----------------------------------------------------------------------------- the command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="cases to draw")
    parser.add_argument("--seed", type=int, default=0, help="the generator's seed")
    parser.add_argument("--corpus", action="store_true", help="replay the corpus file instead")
    parser.add_argument(
        "--part", default="1/1", help="i/k: run the i-th of k equal shares of the cases"
    )
    parser.add_argument("--data-dir", default=None, help="dataset cache (default: a temp dir)")
    parser.add_argument("--show", action="store_true", help="print every case and its outcome")
    args = parser.parse_args(argv)
    prepare()
    part = tuple(int(v) for v in args.part.split("/"))
    todo = read_corpus()[part[0] - 1 :: part[1]] if args.corpus else cases(args.n, args.seed, part)
    started = time.monotonic()
    failures = []
    with tempfile.TemporaryDirectory(prefix="bprun-fuzz-") as tmp:
        data_dir = Path(args.data_dir) if args.data_dir else Path(tmp) / "data"
        count = 0

        def run(case: Case) -> Outcome:
            nonlocal count
            count += 1
            return run_case(case, Path(tmp) / f"case{count}", data_dir)

        for i, case in enumerate(todo):
            outcome = run(case)
            if args.show:
                print(f"{i:5d} {outcome.kind:14s} {outcome.seconds:5.1f}s {case.line}", flush=True)
            if not outcome.ok:
                small = shrink(case, outcome, run)
                failures.append((small, outcome))
                print(f"FAIL {small.line}\n     {'; '.join(outcome.problems)}", flush=True)
    took = time.monotonic() - started
    cpu = sum(os.times()[2:4])
    print(
        f"{len(todo)} cases, {len(failures)} failing, {took:.0f} s "
        f"({cpu:.0f} s CPU in the cases; seed {args.seed})"
    )
    for small, outcome in failures:
        print(f"  {small.line}  # {outcome.kind}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
