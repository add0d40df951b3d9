"""Index a data set folder into a table with one row per slice, checking every pair.

Two layouts are understood:

* ``kaggle_3m`` - LGG MRI Segmentation: one folder per patient, slices ``<folder>_<n>.tif`` and
  masks ``<folder>_<n>_mask.tif``; ``data.csv`` is joined on the first three parts of the
  folder name.
* ``images_masks`` - a generic ``images/`` + ``masks/`` pair of folders (the Figshare PNG
  conversion): pairs by file stem; ``labels.csv`` is joined on its first column. These layouts
  carry no patient ids, so every image is its own case.

A data set may also be a YAML file listing folders of one layout (``folders: [../figshare,
../figshare256]``, relative to the file): they are indexed (and cached) each on its own and used as
one; a case name found in two of them is refused, since the same image twice would leak between
training and test.
"""

from __future__ import annotations

import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml

from brainseg.data.cache import (
    DamagedCacheError,
    SliceStore,
    StoreWriter,
    cache_dir_for,
    fingerprint,
    open_store,
    read_manifest,
)
from brainseg.data.checks import (
    CheckReport,
    DecodedPair,
    Kind,
    Problem,
    decode_pair,
    odd_channel_counts,
    relative,
)
from brainseg.data.io import IMAGE_SUFFIXES, TIFF_SUFFIXES
from brainseg.errors import BadInputError
from brainseg.progress import progress as progress_bar

LAYOUTS = ("kaggle_3m", "images_masks")
MANIFEST_SUFFIXES = (".yaml", ".yml")  # a data set file listing folders
COLUMNS = ["patient", "slice", "image_path", "mask_path", "height", "width", "channels",
           "tumour_pixels", "has_tumour", "layout"]
SLICE_NAME = re.compile(r"^(?P<stem>.+)_(?P<number>\d+)(?P<mask>_mask)?$", re.IGNORECASE)
_NATURAL = re.compile(r"(\d+)")


@dataclass
class Pair:
    patient: str
    slice: int
    image: Path
    mask: Path


@dataclass
class Discovery:
    """What listing the folder found, before any file is decoded."""

    layout: str
    root: Path
    pairs: list[Pair]
    problems: list[Problem]
    files: list[tuple[str, int, int]]  # (relative name, size, mtime_ns) of every source file
    metadata: pd.DataFrame | None = None
    metadata_key: str = ""


@dataclass
class Scan:
    """An indexed data set: its table, its decoded slices and what the checks found."""

    table: pd.DataFrame
    store: SliceStore
    report: CheckReport
    layout: str
    root: Path
    from_cache: bool = False
    notes: list[str] = field(default_factory=list)


def natural_key(text: str) -> list:
    """Sort key that orders 'slice_10' after 'slice_9'."""
    return [int(part) if part.isdigit() else part.lower() for part in _NATURAL.split(text)]


def detect_layout(root: Path) -> tuple[str, Path]:
    """Return the layout name and the folder that holds it (kaggle_3m may sit one level down)."""
    if (root / "images").is_dir() and (root / "masks").is_dir():
        return "images_masks", root
    for candidate in (root, root / "kaggle_3m"):
        if candidate.is_dir() and any(_is_patient_folder(p) for p in _subfolders(candidate)):
            return "kaggle_3m", candidate
    raise BadInputError(root, "cannot tell the layout: expected patient folders of .tif slices "
                              "(kaggle_3m) or images/ and masks/ folders (images_masks)")


def scan(root: str | Path, layout: str = "auto", *, cache: bool = True, progress: bool = False,
         workers: int | None = None, require_slices: bool = True) -> Scan:
    """Index, check and decode a data set, reusing the on-disk cache when nothing changed.

    Unless `require_slices` is off (checking only), a data set none of whose pairs can be read is
    refused here with its first problem, rather than met later as an empty table."""
    root = Path(root).expanduser()
    if not root.exists():
        raise BadInputError(root, "is a broken symbolic link or a link loop" if root.is_symlink()
                            else "folder does not exist")
    if is_data_set_file(root):
        return _scan_folders(root, layout, cache=cache, progress=progress, workers=workers,
                             require_slices=require_slices)
    if not root.is_dir():
        raise BadInputError(root, "not a folder (nor a .yaml file listing folders)")
    notes = []
    if layout == "auto":
        layout, root = detect_layout(root)
        notes.append(f"layout: {layout} (auto-detected)")
    elif layout not in LAYOUTS:
        raise BadInputError(root, f"unknown layout {layout!r}; choose one of: {', '.join(LAYOUTS)}")
    elif layout == "kaggle_3m" and not any(map(_is_patient_folder, _subfolders(root))) \
            and (root / "kaggle_3m").is_dir():
        root = root / "kaggle_3m"
    found = _discover_kaggle(root) if layout == "kaggle_3m" else _discover_images_masks(root)
    if not found.pairs:
        details = "; ".join(p.line() for p in found.problems[:3])
        raise BadInputError(root, "no usable image/mask pairs found"
                                  + (f" ({details})" if details else ""))

    digest = fingerprint(found.files)
    directory = cache_dir_for(root, layout) if cache else None
    cached = _read_cache(directory, digest, notes) if directory is not None else None
    from_cache = cached is not None
    if cached is not None:
        table, store, content_problems = cached
    else:
        table, store, content_problems = _decode(found, directory, digest, progress, workers)
    usual, odd = odd_channel_counts(table["channels"].tolist(), table["image_path"].tolist(), root)
    if odd:  # left out here, cached or not; their decoded pixels stay in the store, unused
        table = table[table["channels"] == usual].reset_index(drop=True)
        content_problems = [*content_problems, *odd]
    table.attrs.update(layout=layout, root=str(root))
    report = CheckReport(found.problems + content_problems)
    if require_slices and table.empty:
        raise BadInputError(root, f"no readable image/mask pair: all {len(found.pairs)} have problems "
                                  f"({report.problems[0].line()}; `brainseg check` lists them)")
    return Scan(table, store, report, layout, root, from_cache, notes)


def is_data_set_file(path: Path) -> bool:
    """A YAML file listing a data set's folders, given where a data folder is expected."""
    return path.suffix.lower() in MANIFEST_SUFFIXES and path.is_file()


def manifest_folders(manifest: Path) -> list[Path]:
    """The folders a data set file lists (`folders:`), resolved against the file's own folder."""
    try:
        content = yaml.safe_load(manifest.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise BadInputError(manifest, f"cannot be read as YAML ({str(error).splitlines()[0]})") from None
    folders = content.get("folders") if isinstance(content, dict) else None
    if not isinstance(folders, list) or not folders or not all(isinstance(f, str) for f in folders):
        raise BadInputError(manifest, "must list the data set's folders as 'folders: [DIR, DIR, ...]'")
    return [(manifest.parent / Path(folder).expanduser()).resolve() for folder in folders]


def _scan_folders(manifest: Path, layout: str, **options) -> Scan:
    """Several folders of one layout, indexed each on its own and joined into one data set."""
    parts = [scan(folder, layout, **options) for folder in manifest_folders(manifest)]
    layouts = {part.layout for part in parts}
    if len(layouts) > 1:
        raise BadInputError(manifest, f"mixes layouts ({', '.join(sorted(layouts))}); list folders of one")
    owner: dict[str, Path] = {}
    for part in parts:
        for case in part.table["patient"].astype(str).unique():
            if case in owner:
                raise BadInputError(manifest, f"{case!r} is in both {owner[case]} and {part.root}; "
                                              "a case may be in one folder only")
            owner[case] = part.root
    table = pd.concat([part.table for part in parts], ignore_index=True)
    table.attrs.update(layout=parts[0].layout, root=str(manifest))
    notes = [f"{part.root}: {len(part.table)} slices" + (" (cached)" if part.from_cache else "")
             for part in parts]
    return Scan(table, JoinedStore([part.store for part in parts]),
                CheckReport([p for part in parts for p in part.report.problems]), parts[0].layout,
                manifest, all(part.from_cache for part in parts), notes)


class JoinedStore:
    """The slice stores of several folders, looked up by image path as one."""

    def __init__(self, stores: list) -> None:
        self.stores = stores
        self.keys = [key for store in stores for key in store.keys]

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key: object) -> bool:
        return any(key in store for store in self.stores)

    def _store(self, key: str):
        return next(store for store in self.stores if key in store)

    def image(self, key: str):
        return self._store(key).image(key)

    def mask(self, key: str):
        return self._store(key).mask(key)


def _read_cache(directory: Path, digest: str,
                notes: list[str]) -> tuple[pd.DataFrame, SliceStore, list[Problem]] | None:
    """The cached table, slices and problems when they are current and whole; None to decode again."""
    manifest = read_manifest(directory)
    if manifest is None or manifest.get("fingerprint") != digest:
        return None
    try:
        table = pd.read_csv(directory / "index.csv", dtype={"patient": str})
        store = open_store(directory)
        problems = CheckReport.from_dicts(manifest["problems"]).problems
        if list(table["image_path"].astype(str)) != store.keys:
            raise DamagedCacheError(f"{directory}: index.csv does not match the slices")
    except (OSError, ValueError, KeyError, TypeError):  # pandas' parse errors are ValueErrors
        notes.append(f"slice cache {directory} was damaged; rebuilt it")
        return None
    return table, store, problems


def index_dataset(root: str | Path, layout: str = "auto", **options) -> pd.DataFrame:
    """One row per usable slice: patient, slice, paths, size, channels and tumour pixels.

    Pairs that fail a check are left out; ``table.attrs['problems']`` lists them.
    """
    result = scan(root, layout, **options)
    result.table.attrs["problems"] = result.report.to_dicts()
    return result.table


def index_for_groups(root: str | Path, group_by: str, layout: str = "auto") -> pd.DataFrame | None:
    """The index a column:NAME grouping looks its groups up in (splits.case_groups); None for any
    other grouping, which needs only the case names."""
    return scan(root, layout).table if group_by.startswith("column:") else None


def check_dataset(root: str | Path, layout: str = "auto", **options) -> CheckReport:
    """Every problem found in the data set's files."""
    return scan(root, layout, require_slices=False, **options).report


# --- discovery -------------------------------------------------------------------------------

def _subfolders(root: Path) -> list[Path]:
    try:
        folders = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "__"))]
        return sorted(folders, key=lambda p: natural_key(p.name))
    except OSError:
        return []


def _is_patient_folder(folder: Path) -> bool:
    return any(entry.suffix.lower() in TIFF_SUFFIXES for entry in folder.iterdir())


def _listing(folder: Path, root: Path) -> list[tuple[Path, int, int]]:
    """Visible files of a folder with their size and mtime, in natural order."""
    entries = []
    with os.scandir(folder) as it:
        for entry in it:
            if entry.name.startswith(".") or not entry.is_file():
                continue
            stat = entry.stat()
            entries.append((Path(entry.path), stat.st_size, stat.st_mtime_ns))
    return sorted(entries, key=lambda e: natural_key(e[0].name))


def _discover_kaggle(root: Path) -> Discovery:
    pairs: list[Pair] = []
    problems: list[Problem] = []
    files: list[tuple[str, int, int]] = []
    folders = _subfolders(root)
    if not folders:
        problems.append(Problem(Kind.EMPTY_FOLDER, (str(root),), "no patient folders"))
    for folder in folders:
        listing = _listing(folder, root)
        files += [(relative(path, root), size, mtime) for path, size, mtime in listing]
        if not listing:
            problems.append(Problem(Kind.EMPTY_FOLDER, (relative(folder, root),)))
            continue
        images: dict[int, list[Path]] = {}
        masks: dict[int, list[Path]] = {}
        for path, _, _ in listing:
            match = SLICE_NAME.match(path.stem)
            if path.suffix.lower() not in TIFF_SUFFIXES or match is None:
                problems.append(Problem(Kind.UNRECOGNISED, (relative(path, root),),
                                        "expected <folder>_<n>.tif or <folder>_<n>_mask.tif"))
                continue
            group = masks if match["mask"] else images
            group.setdefault(int(match["number"]), []).append(path)
        pairs += _pair_numbers(folder.name, images, masks, root, problems)
    metadata = None
    data_csv = root / "data.csv"
    if data_csv.is_file():
        stat = data_csv.stat()
        files.append(("data.csv", stat.st_size, stat.st_mtime_ns))
        metadata = _read_metadata(data_csv)
    return Discovery("kaggle_3m", root, pairs, problems, files, metadata, "Patient")


def _pair_numbers(patient: str, images: dict[int, list[Path]], masks: dict[int, list[Path]],
                  root: Path, problems: list[Problem]) -> list[Pair]:
    pairs = []
    numbers = sorted(set(images) | set(masks))
    for number in numbers:
        matched = _match(images.get(number, []), masks.get(number, []), root, problems, f"slice {number}")
        if matched:
            pairs.append(Pair(patient, number, *matched))
    if numbers:
        missing = sorted(set(range(numbers[0], numbers[-1] + 1)) - set(numbers))
        if missing:
            shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
            problems.append(Problem(Kind.SLICE_GAP, (patient,), f"{len(missing)} missing: {shown}"))
    return pairs


def _match(images: list[Path], masks: list[Path], root: Path, problems: list[Problem],
           what: str) -> tuple[Path, Path] | None:
    """The (image, mask) of one slice number or stem, or None with the problem recorded."""
    names = tuple(relative(p, root) for p in images + masks)
    if len(images) > 1 or len(masks) > 1:
        problems.append(Problem(Kind.DUPLICATE_SLICE, names, f"{what} appears twice"))
    elif not masks:
        problems.append(Problem(Kind.MISSING_MASK, names))
    elif not images:
        problems.append(Problem(Kind.MISSING_IMAGE, names))
    else:
        return images[0], masks[0]
    return None


def _discover_images_masks(root: Path) -> Discovery:
    problems: list[Problem] = []
    files: list[tuple[str, int, int]] = []
    by_stem: dict[str, dict[str, list[Path]]] = {"images": {}, "masks": {}}
    for side in ("images", "masks"):
        if not (root / side).is_dir():
            raise BadInputError(root / side, "folder not found (the images_masks layout needs "
                                             "images/ and masks/)")
        listing = _listing(root / side, root)
        files += [(relative(path, root), size, mtime) for path, size, mtime in listing]
        if not listing:
            problems.append(Problem(Kind.EMPTY_FOLDER, (side,)))
        for path, _, _ in listing:
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                problems.append(Problem(Kind.UNRECOGNISED, (relative(path, root),),
                                        f"not an image file ({', '.join(sorted(IMAGE_SUFFIXES))})"))
                continue
            stem = path.stem
            if side == "masks" and stem.lower().endswith("_mask"):
                stem = stem[: -len("_mask")]
            by_stem[side].setdefault(stem, []).append(path)
    pairs = []
    images, masks = by_stem["images"], by_stem["masks"]
    for stem in sorted(set(images) | set(masks), key=natural_key):
        matched = _match(images.get(stem, []), masks.get(stem, []), root, problems, f"stem {stem!r}")
        if matched:
            pairs.append(Pair(stem, 1, *matched))
    metadata = None
    labels_csv = root / "labels.csv"
    if labels_csv.is_file():
        stat = labels_csv.stat()
        files.append(("labels.csv", stat.st_size, stat.st_mtime_ns))
        metadata = _read_metadata(labels_csv)
    key = str(metadata.columns[0]) if metadata is not None and len(metadata.columns) else ""
    return Discovery("images_masks", root, pairs, problems, files, metadata, key)


def _read_metadata(path: Path) -> pd.DataFrame | None:
    """Read a metadata CSV with the same type inference a cached index.csv gets on reading."""
    try:
        table = pd.read_csv(path)
        if len(table.columns):  # the join key is matched as text
            table[table.columns[0]] = table[table.columns[0]].astype(str)
        return table
    except (OSError, ValueError, pd.errors.ParserError) as error:
        print(f"warning: {path}: cannot read ({error}); not joined", file=sys.stderr)
        return None


# --- decoding --------------------------------------------------------------------------------

def _decode(found: Discovery, directory: Path | None, digest: str, progress: bool,
            workers: int | None) -> tuple[pd.DataFrame, SliceStore, list[Problem]]:
    writer = StoreWriter(directory)
    rows, keys, problems = [], [], []
    workers = workers or min(4, os.cpu_count() or 1)
    try:
        with ThreadPoolExecutor(workers) as pool:
            decoded = pool.map(lambda p: decode_pair(p.image, p.mask, found.root), found.pairs)
            results = zip(found.pairs, decoded, strict=True)
            unit = "slice" if found.layout == "kaggle_3m" else "image"
            for pair, result in progress_bar(results, desc=f"reading {unit}s", unit=unit,
                                             total=len(found.pairs), enabled=progress):
                if isinstance(result, Problem):
                    problems.append(result)
                    continue
                writer.add(result.image, result.mask)
                keys.append(str(pair.image))
                rows.append(_row(pair, result, found.layout))
        table = _join_metadata(pd.DataFrame(rows, columns=COLUMNS), found)
        if directory is not None:  # into the staging folder, so the cache appears whole or not at all
            table.to_csv(writer.staging / "index.csv", index=False)
        store = writer.finish(keys, {"fingerprint": digest, "root": str(found.root),
                                     "layout": found.layout,
                                     "problems": [p.to_dict() for p in problems]})
    except BaseException:
        writer.abort()
        raise
    return table, store, problems


def _row(pair: Pair, decoded: DecodedPair, layout: str) -> dict:
    height, width, channels = decoded.image.shape
    tumour = int(decoded.mask.sum(dtype="int64"))
    return {"patient": pair.patient, "slice": pair.slice, "image_path": str(pair.image),
            "mask_path": str(pair.mask), "height": height, "width": width, "channels": channels,
            "tumour_pixels": tumour, "has_tumour": tumour > 0, "layout": layout}


def _join_metadata(table: pd.DataFrame, found: Discovery) -> pd.DataFrame:
    metadata = found.metadata
    if metadata is None or found.metadata_key not in metadata.columns or table.empty:
        return table
    metadata = metadata.drop_duplicates(found.metadata_key).set_index(found.metadata_key)
    metadata = metadata.drop(columns=[c for c in metadata.columns if c in table.columns])
    if found.layout == "kaggle_3m":
        keys = table["patient"].str.split("_").str[:3].str.join("_")
    else:
        keys = table["patient"]
    joined = metadata.reindex(keys.to_numpy())
    joined.index = table.index
    return pd.concat([table, joined], axis=1)

# --- writing ---------------------------------------------------------------------------------

def ensure_outside(path: str | Path, data_root: str | Path) -> Path:
    """Refuse an output path inside the data folder (each folder a data set file lists): nothing is
    ever written there."""
    path, data_root = Path(path), Path(data_root)
    if is_data_set_file(data_root):
        for folder in manifest_folders(data_root):
            ensure_outside(path, folder)
        return path
    try:
        resolved, root = path.resolve(), data_root.resolve()
    except (RuntimeError, OSError):  # Python 3.11 raises RuntimeError on a symlink loop
        looped = next(p for p in (path, data_root) if _unresolvable(p))
        raise BadInputError(looped, "is a symbolic link loop") from None
    if resolved == root or root in resolved.parents:
        raise BadInputError(path, f"is inside the data folder {data_root}; write outputs elsewhere")
    return path


def _unresolvable(path: Path) -> bool:
    try:
        path.resolve()
    except (RuntimeError, OSError):
        return True
    return False


def write_index(root: str | Path, out: str | Path, layout: str = "auto", **options) -> Scan:
    """Index a data set and write the table as CSV (and its problems beside it, if any)."""
    ensure_outside(out, root)
    result = scan(root, layout, **options)
    out = ensure_outside(out, result.root)
    out.parent.mkdir(parents=True, exist_ok=True)
    result.table.to_csv(out, index=False)
    problems_csv = out.with_name(f"{out.stem}_problems.csv")
    if not result.report.ok:
        rows = [{**p, "files": " ".join(p["files"])} for p in result.report.to_dicts()]
        pd.DataFrame(rows, columns=["kind", "files", "detail"]).to_csv(problems_csv, index=False)
    elif problems_csv.exists():
        problems_csv.unlink()  # a stale list from an earlier run would mislead
    return result
