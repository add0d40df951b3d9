"""`brainseg merge`: the prediction folders of one batch's shares (`brainseg predict --shard K/N`, run on N
machines or as a SLURM array) joined into one predictions.csv and predictions.json.

The masks stay in the shards' folders: the merged table lists where each one is (its path rebased from
the --out a shard was written to onto the folder given here, so shard folders may be copied or moved
first). Refused, naming what: a folder that is no finished shard, shards of different batches or
settings, one share given twice, a case in two shards, and (unless allowed) a share that is missing.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path, PurePath

from brainseg.errors import BadInputError, OptionError
from brainseg.files import replacing, writing
from brainseg.predict import SETTINGS_FILE, TABLE_FILE, parse_shard

# What differs from shard to shard; every other setting must be the same in all of them.
SHARD_SETTINGS = ("shard", "shard_of", "batch", "out", "cases", "failed")


def read_shard(folder: Path) -> tuple[dict, list[str], list[dict]]:
    """A finished shard's settings (with "k" and "n" added), its table's columns and its rows."""
    if not folder.is_dir():
        raise BadInputError(folder, "not a folder" if folder.exists() else "does not exist")
    settings_file, table_file = folder / SETTINGS_FILE, folder / TABLE_FILE
    if not settings_file.is_file() or not table_file.is_file():
        raise BadInputError(folder, f"no {SETTINGS_FILE} and {TABLE_FILE}: not the --out of a finished "
                                    "brainseg predict (a shard still running, or one that was stopped?)")
    try:
        settings = json.loads(settings_file.read_text())
        with table_file.open(newline="") as file:
            reader = csv.DictReader(file)
            rows = list(reader)
            columns = list(reader.fieldnames or [])
    except (ValueError, csv.Error, UnicodeDecodeError) as error:
        raise BadInputError(folder, f"unreadable {SETTINGS_FILE} or {TABLE_FILE} ({error})") from None
    if not isinstance(settings, dict) or "shard" not in settings:
        raise BadInputError(folder, "was not predicted with --shard K/N (or is a merge already)")
    try:
        settings["k"], settings["n"] = parse_shard(settings["shard"])
    except OptionError:
        raise BadInputError(settings_file, f"shard {settings['shard']!r} is not K/N") from None
    if len(rows) != settings.get("cases"):
        raise BadInputError(table_file, f"holds {len(rows)} cases but {SETTINGS_FILE} counts "
                                        f"{settings.get('cases')} (an edited or damaged shard)")
    return settings, columns, rows


def rebased(mask: str, written_to: str, folder: Path) -> str:
    """A mask path as predict wrote it (under the --out it was given) moved onto `folder`."""
    if not mask:
        return mask
    try:
        return str(folder / PurePath(mask).relative_to(PurePath(written_to)))
    except ValueError:  # not under that --out: left as written
        return mask


def merge_predictions(folders: list[str | Path], out: str | Path, *, allow_missing: bool = False,
                      overwrite: bool = False) -> dict:
    """Join the shards in `folders` into `out`/predictions.csv (rows in order of case) and
    predictions.json (the shared settings, the counts, each shard's folder, the shares missing);
    returns what predictions.json holds, with "notes" on masks that are listed but absent."""
    folders = [Path(folder) for folder in folders]
    out = Path(out)
    if not folders:
        raise OptionError("give the folders of the shards to merge")
    shards = [(folder, *read_shard(folder)) for folder in folders]
    first_folder, first, columns, _ = shards[0]
    given: dict[int, Path] = {}
    for folder, settings, their_columns, _ in shards:
        if any(settings.get(key) != first.get(key) for key in ("n", "shard_of", "batch")):
            raise BadInputError(folder, f"is shard {settings['shard']} of {settings.get('shard_of')} cases, "
                                        f"but {first_folder} is shard {first['shard']} of "
                                        f"{first.get('shard_of')}: shards of different batches")
        differing = sorted(key for key in {*settings, *first} - {*SHARD_SETTINGS, "k", "n"}
                           if settings.get(key) != first.get(key))
        if differing:
            key = differing[0]
            raise BadInputError(folder, f"was predicted with {key} {settings.get(key)!r}, but {first_folder} "
                                        f"with {first.get(key)!r}: shards of different settings")
        if their_columns != columns:
            raise BadInputError(folder, f"its {TABLE_FILE} has other columns than {first_folder}'s")
        if settings["k"] in given:
            raise BadInputError(folder, f"is shard {settings['shard']}, as {given[settings['k']]} is")
        given[settings["k"]] = folder
    n = first["n"]
    missing = [f"{k}/{n}" for k in range(1, n + 1) if k not in given]
    if missing and not allow_missing:
        raise OptionError(f"shard{'s' if len(missing) > 1 else ''} {', '.join(missing)} missing: give the "
                          f"folders of all {n} shards (or --allow-missing to merge those given)")
    _check_out(out, folders, overwrite)

    rows, seen = [], {}
    for folder, settings, _, shard_rows in shards:
        for row in shard_rows:
            key = (row.get("case", ""), row.get("input", ""))
            if key in seen:
                raise BadInputError(folder, f"holds case {key[0]!r} ({key[1]}), as {seen[key]} does: a "
                                            "case in two shards")
            seen[key] = folder
            rows.append({**row, "mask": rebased(row.get("mask", ""), settings.get("out", ""), folder)})
    rows.sort(key=lambda row: (row.get("case", ""), row.get("input", "")))
    absent = [row["mask"] for row in rows if row.get("status") == "ok" and row.get("mask")
              and not Path(row["mask"]).exists()]
    notes = [f"{len(absent)} listed mask(s) not found, e.g. {absent[0]}"] if absent else []
    statuses = Counter(row.get("status") == "ok" for row in rows)
    common = {key: value for key, value in first.items() if key not in (*SHARD_SETTINGS, "k", "n")}
    summary = {**common, "batch": first.get("batch"), "cases": len(rows), "failed": statuses[False],
               "shards": [{"shard": settings["shard"], "folder": str(folder), "cases": settings["cases"],
                           "failed": settings.get("failed")}
                          for folder, settings, _, _ in sorted(shards, key=lambda shard: shard[1]["k"])],
               "missing_shards": missing, **({"notes": notes} if notes else {})}
    out.mkdir(parents=True, exist_ok=True)
    table = out / TABLE_FILE
    with writing(table), replacing(table) as partial, partial.open("w", newline="") as file:
        writer = csv.DictWriter(file, columns, restval="", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    settings_file = out / SETTINGS_FILE
    with writing(settings_file), replacing(settings_file) as partial:
        partial.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _check_out(out: Path, folders: list[Path], overwrite: bool) -> None:
    """Refuse an `out` that is one of the shards, or holds predictions, unless `overwrite`."""
    for folder in folders:
        if out.resolve() == folder.resolve():
            raise BadInputError(out, "is one of the shards; write the merge to a folder of its own")
    earlier = [name for name in (TABLE_FILE, SETTINGS_FILE) if (out / name).exists()]
    if earlier and not overwrite:
        raise BadInputError(out, f"already holds predictions ({', '.join(earlier)}); pass --overwrite to "
                                 "replace them, or choose another --out")
