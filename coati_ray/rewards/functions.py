"""Reward functions: load `path/to/file.py:name` or `package.module:name`, call it on a batch, and
check what it returns.

A reward function is `name(prompts: list[str], responses: list[str], **columns) -> list[float]`:
`columns` are the prompt rows' other columns (e.g. `answer`, `tests`), one value per sample. An
`async def` is awaited. It runs in the reward actors, never in the driver; the driver only checks
that the file and the name exist (without running the file).
"""

from __future__ import annotations

import ast
import asyncio
import importlib
import importlib.util
import inspect
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from coati_ray.errors import CoatiError, ConfigError


@dataclass
class RewardBatch:
    """What every reward source scores: one entry per sample, in the rollout's order."""

    prompts: list[str]  # the prompt as the dataset has it (before the chat template)
    responses: list[str]  # the sampled response, decoded without special tokens
    columns: dict[str, list[Any]] = field(default_factory=dict)  # the prompt rows' other columns
    sample_ids: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.prompts)

    def select(self, i: int) -> RewardBatch:
        return RewardBatch([self.prompts[i]], [self.responses[i]], {k: [v[i]] for k, v in self.columns.items()},
                           [self.sample_ids[i]])


class RewardError(CoatiError, RuntimeError):
    """A reward source failed on a batch: its message names the source, the sample and the cause."""


def split_spec(spec: str) -> tuple[str, str]:
    """'rewards.py:score' -> ('rewards.py', 'score'); the last ':' separates (a Windows drive has one too)."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name.isidentifier():
        raise ConfigError("reward_fn", f"expected 'path/to/file.py:function' or 'package.module:function' (or a "
                          f"built-in: math, demo, format:REGEX), got {spec!r}")
    return target, name


def check_function_spec(spec: str) -> None:
    """Before Ray starts: the file (or module) exists and defines `name`. Nothing of it is run here."""
    target, name = split_spec(spec)
    if target.endswith(".py") or "/" in target:
        path = Path(target)
        if not path.is_file():
            raise ConfigError("reward_fn", f"{target}: no such file")
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        except (SyntaxError, UnicodeDecodeError) as e:
            raise ConfigError("reward_fn", f"{target} does not parse as Python: {e}") from None
        defined = _top_level_names(tree)
        if name not in defined:
            raise ConfigError("reward_fn", f"{target} defines no {name!r} (it defines: "
                              f"{', '.join(sorted(defined)) or 'nothing'})")
        return
    try:
        found = importlib.util.find_spec(target)
    except (ImportError, ValueError):
        found = None
    if found is None:
        raise ConfigError("reward_fn", f"no module named {target!r} (nor a file {target}.py)")


def _top_level_names(tree: ast.Module) -> set[str]:
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, (ast.ImportFrom, ast.Import)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def load_function(spec: str) -> Callable:
    """Import the function `spec` names (in the reward actor)."""
    target, name = split_spec(spec)
    if target.endswith(".py") or "/" in target:
        path = Path(target).resolve()
        mod_name = f"coati_reward_{abs(hash(str(path)))}"
        loader = importlib.util.spec_from_file_location(mod_name, path)
        if loader is None or loader.loader is None:
            raise ConfigError("reward_fn", f"{target}: not a Python file")
        module = importlib.util.module_from_spec(loader)
        try:
            loader.loader.exec_module(module)
        except Exception as e:
            raise ConfigError("reward_fn", f"importing {target} failed: {type(e).__name__}: {_first_line(e)}") from None
    else:
        try:
            module = importlib.import_module(target)
        except Exception as e:
            raise ConfigError("reward_fn", f"importing {target} failed: {type(e).__name__}: {_first_line(e)}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError("reward_fn", f"{target}.{name} is {'missing' if fn is None else 'not callable'}")
    return fn


def call_reward_function(fn: Callable, label: str, batch: RewardBatch) -> list[float]:
    """`fn(prompts, responses, **columns)`, awaited when async, checked: one finite number per sample.

    When the batch call raises, the samples are tried one by one to name the first that fails.
    """
    try:
        out = _call(fn, batch)
    except Exception as e:
        bad = _first_failing_sample(fn, batch)
        where = f" on sample {bad}" if bad is not None else f" on a batch of {len(batch)} samples"
        raise RewardError(f"reward {label} raised{where}: {type(e).__name__}: {_first_line(e)}") from None
    return check_rewards(out, label, batch.sample_ids)


def _call(fn: Callable, batch: RewardBatch):
    result = fn(batch.prompts, batch.responses, **batch.columns)
    if inspect.isawaitable(result):
        result = asyncio.run(_await(result))
    return result


async def _await(awaitable):
    return await awaitable


def _first_failing_sample(fn: Callable, batch: RewardBatch) -> int | None:
    if len(batch) == 1:
        return batch.sample_ids[0]
    for i in range(len(batch)):
        try:
            _call(fn, batch.select(i))
        except Exception:
            return batch.sample_ids[i]
    return None  # fails only on the whole batch


def check_rewards(out: Any, label: str, sample_ids: list[int]) -> list[float]:
    """One finite number per sample (bools count as 0/1), else a RewardError naming the sample."""
    if hasattr(out, "tolist"):  # a tensor or numpy array
        out = out.tolist()
    if not isinstance(out, (list, tuple)):
        raise RewardError(f"reward {label} returned {type(out).__name__}; expected a list of {len(sample_ids)} "
                          "numbers")
    if len(out) != len(sample_ids):
        raise RewardError(f"reward {label} returned {len(out)} rewards for {len(sample_ids)} samples")
    values = []
    for sid, v in zip(sample_ids, out):
        if not isinstance(v, numbers.Real):
            raise RewardError(f"reward {label} returned {type(v).__name__} {v!r:.60} for sample {sid}; expected a "
                              "number")
        v = float(v)
        if not math.isfinite(v):
            raise RewardError(f"reward {label} returned {v} for sample {sid}; expected a finite number")
        values.append(v)
    return values


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else "(no message)"
