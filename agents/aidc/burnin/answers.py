"""The stored known answers of the burn-in's SDC checks, and the verdict on every GPU's fingerprints
(computed by `aidc.burnin.known_answer`; this module needs no torch).

Known answers live in versioned YAML files (`version: 1`, `answers: {key: {check: sha256}}`):
the packaged `aidc/data/known_answers.yaml`, and the site's own file, written by
`aidc burnin run --record-known-answers` from a run whose GPUs all agreed.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from importlib import resources
from pathlib import Path

from aidc.errors import BurninError
from aidc.files import SHARED_MODE, write_atomic

FORMAT_VERSION = 1
PACKAGED = Path(str(resources.files("aidc").joinpath("data/known_answers.yaml")))


# --- judging ------------------------------------------------------------------------------------

def judge_known_answers(nodes: dict, stored: dict[str, dict[str, str]]) -> None:
    """Add reasons, notes and `failed_gpus` to NodeResults from their GPUs' fingerprints.

    Per (GPU model, key, check): the stored known answer when there is one, else the majority of
    the run's GPUs; with no strict majority every GPU of the group fails. A GPU in a group of
    one with nothing stored is a note (nothing to compare with), not a pass by vote.
    """
    groups: dict[tuple, list[tuple]] = defaultdict(list)
    for n in nodes.values():
        for g in n.gpus:
            answers = g.get("known_answer")
            if not answers:
                _fail(n, g["index"], f"GPU {g['index']}: the known-answer checks did not run")
                continue
            n.notes += [f"GPU {g['index']}: not checked: {why}" for why in answers.get("unsupported", [])]
            for check, fp in answers["fingerprints"].items():
                groups[(n.gpu_model, answers["key"], check)].append((n, g["index"], fp))
    alone: dict[tuple, list[str]] = defaultdict(list)
    for (model, key, check), members in sorted(groups.items(), key=lambda kv: kv[0]):
        reference = stored.get(key, {}).get(check)
        if reference is not None:
            source = "the stored known answer"
        elif len(members) == 1:
            n, index, _ = members[0]
            alone[(n.node, index)].append(check)
            continue
        else:
            counts = Counter(fp for _, _, fp in members)
            reference, votes = counts.most_common(1)[0]
            if votes * 2 <= len(members):
                for n, index, fp in members:
                    _fail(n, index, f"GPU {index}: {check} results differ across the {len(members)} {model} GPUs"
                                    f" with no majority ({len(counts)} distinct): silent data corruption")
                continue
            source = f"the {votes} of {len(members)} {model} GPUs that agree"
        for n, index, fp in members:
            if fp != reference:
                _fail(n, index, f"GPU {index}: {check} result differs from {source} ({fp[:12]} vs"
                                f" {reference[:12]}): silent data corruption")
    for (node, index), checks in alone.items():
        nodes[node].notes.append(f"GPU {index}: no stored known answer and no other GPU of this model and software"
                                 f" to compare with ({', '.join(checks)}): record one with --record-known-answers")


def _fail(n, index: int, reason: str) -> None:
    n.reasons.append(reason)
    if index not in n.failed_gpus:
        n.failed_gpus.append(index)
        n.failed_gpus.sort()


# --- the stored answers -------------------------------------------------------------------------

def load(path: str | os.PathLike) -> dict[str, dict[str, str]]:
    """{key: {check: sha256}} from a known-answers file; {} when there is no file."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise BurninError(f"{path}: not a known-answers file ({' '.join(str(exc).split())})") from None
    expected = f"expected 'version: {FORMAT_VERSION}' and 'answers: {{<key>: {{<check>: <sha256>}}}}'"
    if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION or not isinstance(data.get("answers"), dict):
        raise BurninError(f"{path}: not a known-answers file ({expected})")
    for key, checks in data["answers"].items():
        if not isinstance(checks, dict) or not all(isinstance(c, str) and isinstance(v, str)
                                                   for c, v in checks.items()):
            raise BurninError(f"{path}: answers for {key!r} are not check names mapped to digests ({expected})")
    return {str(k): dict(v) for k, v in data["answers"].items()}


def load_all(site_file: str | os.PathLike | None) -> dict[str, dict[str, str]]:
    """The packaged answers, overlaid by the site's file (which may not exist yet)."""
    answers = load(PACKAGED)
    if site_file is not None:
        for key, checks in load(site_file).items():
            answers[key] = {**answers.get(key, {}), **checks}
    return answers


def record(path: str | os.PathLike, nodes: dict) -> tuple[list[str], list[str]]:
    """Write the run's answers for every key on which all its GPUs agreed into `path` (kept
    entries for other keys stay). Returns (recorded keys, keys skipped for disagreement)."""
    import yaml

    seen: dict[str, dict[str, set]] = defaultdict(lambda: defaultdict(set))
    for n in nodes.values():
        for g in n.gpus:
            if g.get("known_answer"):
                for check, fp in g["known_answer"]["fingerprints"].items():
                    seen[g["known_answer"]["key"]][check].add(fp)
    agreed = {key: {c: next(iter(fps)) for c, fps in checks.items()} for key, checks in seen.items()
              if all(len(fps) == 1 for fps in checks.values())}
    path = Path(path)
    answers = {**load(path), **agreed}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, "# Known answers of the burn-in's seeded checks, by device/host and software key\n"
                       "# (written by `aidc burnin run --record-known-answers`; see aidc.burnin.known_answer).\n"
                       + yaml.safe_dump({"version": FORMAT_VERSION, "answers": answers}, sort_keys=True), SHARED_MODE)
    return sorted(agreed), sorted(set(seen) - set(agreed))
