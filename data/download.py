"""Download the challenge's published FineWeb shards and tokenizer from the Hugging Face hub.

Layout of the published dataset repos (openai/parameter-golf, data/cached_challenge_fineweb.py):
a dataset repo holds, under the root folder `datasets/`, `manifest.json`,
`datasets/fineweb10B_sp{V}/fineweb_{val,train}_XXXXXX.bin` and `tokenizers/fineweb_{V}_bpe.{model,vocab}`.
sp1024 is published in willdepueoai/parameter-golf; sp4096 and sp8192 in kevclark/parameter-golf.
The manifest lists each dataset (`name`, `tokenizer_name`, `vocab_size`, `stats` with
files_/tokens_ per split) and each tokenizer (`model_path`, `vocab_path`), plus `shard_size`.

CaseOps (--variant sp8192_caseops, or its hub name sp8192_lossless_caps_caseops_v1_reserved): the
records' export (records/track_10min_16mb/2026-04-18_PR1626_CaseOps_Taper, PR #1729) in
romeerp/parameter-golf-caseops-v1, same layout, dataset fineweb10B_sp8192_lossless_caps_caseops_v1_reserved;
its manifest entry has `val_bytes_glob`, so the val byte sidecars fineweb_val_bytes_XXXXXX.bin come
with the val shards (checked like shards: one count per val token).

Local layout (--local-dir, default data/): datasets/fineweb10B_sp{V}/ and tokenizers/, the same as
the official downloader. The manifest is saved as datasets/fineweb10B_sp{V}/hub_manifest.json, so
each dataset keeps the manifest of the repo it came from.

Integrity: a file counts as present only if its size matches the hub's, a shard's header is valid
(train_gpt.read_shard_header) with the token count the manifest implies, and a tokenizer loads
with the manifest's vocabulary size (and matches the hub's sha256). Anything else is downloaded
again: into a staging folder first, checked, then renamed into place, so an interrupted run never
leaves a half file under its final name, and the next run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import hf_hub_download
from tqdm import tqdm

from data._common import expected_tokens, fail, run_main, sha256_file, tg, write_json

HUB_REPOS = {
    "sp1024": "willdepueoai/parameter-golf",
    "sp4096": "kevclark/parameter-golf",
    "sp8192": "kevclark/parameter-golf",
    "sp8192_caseops": "romeerp/parameter-golf-caseops-v1",
}
CASEOPS_SUFFIX = "_lossless_caps_caseops_v1_reserved"  # the hub's dataset and tokenizer names
VARIANT_ALIASES = {"sp8192_caseops": f"sp8192{CASEOPS_SUFFIX}"}
HUB_REPOS[VARIANT_ALIASES["sp8192_caseops"]] = HUB_REPOS["sp8192_caseops"]  # the records' variant name
REMOTE_ROOT = "datasets"
LOCAL_MANIFEST = "hub_manifest.json"
DEFAULT_TRAIN_SHARDS = 80  # 8B tokens, as the official downloader


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data.download",
        description="Download the challenge's FineWeb shards and tokenizer (resumable; files already "
        "present and verified are skipped).",
    )
    parser.add_argument(
        "--variant",
        default="sp1024",
        help="tokenizer family: sp1024 (default), sp4096, sp8192 or sp8192_caseops (any sp<V> with --source)",
    )
    parser.add_argument(
        "--train-shards",
        type=int,
        default=DEFAULT_TRAIN_SHARDS,
        help=f"train shards to fetch, 100M tokens each (default {DEFAULT_TRAIN_SHARDS}); val comes whole",
    )
    parser.add_argument(
        "--local-dir", type=Path, default=Path("data"), help="where datasets/ and tokenizers/ go"
    )
    parser.add_argument(
        "--source",
        default=None,
        help="hub dataset repo id (default: the repo that publishes the variant), or a local folder "
        "laid out like that repo (a mirror)",
    )
    parser.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    parser.add_argument(
        "--remote-root", default=REMOTE_ROOT, help="folder inside the repo (default datasets)"
    )
    parser.add_argument(
        "--skip-manifest",
        action="store_true",
        help=f"reuse the saved {LOCAL_MANIFEST} instead of fetching it",
    )
    parser.add_argument("--jobs", type=int, default=4, help="parallel downloads (default 4)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


# ----------------------------------------------------------------------------- sources


class HubSource:
    """The real hub: hf_hub_download into a staging folder (it resumes its own .incomplete files)."""

    def __init__(self, repo_id: str, revision: str | None):
        self.repo_id, self.revision = repo_id, revision

    def __str__(self) -> str:
        return f"hub dataset repo {self.repo_id}"

    def fetch(self, remote: str, staging: Path, force: bool) -> Path:
        folder, _, name = remote.rpartition("/")
        try:
            path = hf_hub_download(
                repo_id=self.repo_id,
                filename=name,
                subfolder=folder or None,
                repo_type="dataset",
                revision=self.revision,
                local_dir=staging,
                force_download=force,
            )
        except Exception as exc:
            fail(
                f"{remote}: download from {self} failed ({type(exc).__name__}: {exc}); "
                "check the network (and HF_TOKEN), then run again to resume"
            )
        return Path(path)

    def file_info(self, remotes: list[str]) -> dict[str, tuple[int, str | None]]:
        return hub_file_info(self.repo_id, remotes, self.revision)


def hub_file_info(
    repo_id: str, remotes: list[str], revision: str | None
) -> dict[str, tuple[int, str | None]]:
    """Size and LFS sha256 of each remote file, in one API call; empty if the hub cannot say."""
    from huggingface_hub import HfApi

    try:
        infos = HfApi().get_paths_info(repo_id, remotes, repo_type="dataset", revision=revision)
    except Exception as exc:
        print(
            f"note: no file sizes from the hub ({type(exc).__name__}); checking headers only", file=sys.stderr
        )
        return {}
    result = {}
    for info in infos:
        if getattr(info, "size", None) is not None:
            lfs = getattr(info, "lfs", None)
            result[info.path] = (int(info.size), getattr(lfs, "sha256", None) if lfs else None)
    return result


class LocalSource:
    """A folder laid out like the hub repo (a mirror, or a test fixture)."""

    def __init__(self, root: Path):
        self.root = root

    def __str__(self) -> str:
        return f"local mirror {self.root}"

    def fetch(self, remote: str, staging: Path, force: bool) -> Path:
        src, dest = self.root / remote, staging / remote
        if not src.is_file():
            fail(f"{remote}: not found in {self}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(dest.name + ".part")
        shutil.copyfile(src, part)
        os.replace(part, dest)
        return dest

    def file_info(self, remotes: list[str]) -> dict[str, tuple[int, str | None]]:
        return {r: ((self.root / r).stat().st_size, None) for r in remotes if (self.root / r).is_file()}


def make_source(args: argparse.Namespace) -> HubSource | LocalSource:
    source = args.source or HUB_REPOS.get(args.variant)
    if source is None:
        fail(f"no published repo known for {args.variant}; pass --source REPO_ID or a local mirror folder")
    if Path(source).is_dir():
        return LocalSource(Path(source))
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        fail(f"--source {source}: neither an existing folder nor a hub repo id like owner/name")
    return HubSource(source, args.revision)


# ----------------------------------------------------------------------------- plan


@dataclass
class Target:
    """One file to have locally, with what it must look like."""

    remote: str  # path inside the repo
    local: Path
    kind: str  # "shard", "model", "vocab" or "file"
    tokens: int | None = None  # shards: token count implied by the manifest
    vocab_size: int | None = None  # tokenizer files
    size: int | None = None  # bytes, from the hub
    sha256: str | None = None  # from the hub (LFS); checked for tokenizer files only


def dataset_name(variant: str) -> str:
    variant = VARIANT_ALIASES.get(variant, variant)
    if not re.fullmatch(rf"sp\d+({CASEOPS_SUFFIX})?", variant):
        fail(f"--variant {variant}: expected sp<VOCAB>, e.g. sp1024, sp4096 or sp8192, or sp8192_caseops")
    return f"fineweb10B_{variant}"


def is_caseops_variant(variant: str) -> bool:
    return VARIANT_ALIASES.get(variant, variant).endswith(CASEOPS_SUFFIX)


def local_path(local_dir: Path, rel: str) -> Path:
    """Map a manifest path (datasets/..., tokenizers/...) into --local-dir, refusing escapes."""
    parts = Path(rel).parts
    if not parts or Path(rel).is_absolute() or ".." in parts:
        fail(f"manifest path {rel!r} points outside --local-dir; refusing to write it")
    return local_dir.joinpath(*parts)


def find_entry(manifest: dict, key: str, name: str, source) -> dict:
    for entry in manifest.get(key, []):
        if entry.get("name") == name:
            return entry
    names = ", ".join(str(e.get("name")) for e in manifest.get(key, [])) or "none"
    fail(f"{name} is not in the manifest of {source} (it lists: {names}); pick another --variant or --source")


def plan(manifest: dict, args: argparse.Namespace, source) -> list[Target]:
    name = dataset_name(args.variant)
    entry = find_entry(manifest, "datasets", name, source)
    stats = entry.get("stats") or {}
    n_val, n_train = int(stats.get("files_val", 0)), int(stats.get("files_train", 0))
    if not 0 <= args.train_shards <= n_train:
        fail(f"--train-shards {args.train_shards}: {name} has {n_train} train shards in {source}")
    vocab = entry.get("vocab_size") or int(re.match(r"sp(\d+)", args.variant).group(1))
    if is_caseops_variant(args.variant) and not entry.get("val_bytes_glob"):
        fail(f"{name} in {source} lists no val byte sidecar (val_bytes_glob): its val_bpb would be wrong")
    n_sidecars = n_val if entry.get("val_bytes_glob") else 0
    targets = []
    for split, count in (("val", n_val), ("val_bytes", n_sidecars), ("train", args.train_shards)):
        for i in range(count):
            rel = f"datasets/{name}/fineweb_{split}_{i:06d}.bin"
            tokens = expected_tokens(manifest, stats, split.removesuffix("_bytes"), i)
            targets.append(Target(rel, local_path(args.local_dir, rel), "shard", tokens=tokens))
    tokenizer = find_entry(manifest, "tokenizers", entry.get("tokenizer_name"), source)
    for key, kind in (("model_path", "model"), ("vocab_path", "vocab"), ("path", "file")):
        if tokenizer.get(key):
            rel = str(tokenizer[key])
            targets.append(Target(rel, local_path(args.local_dir, rel), kind, vocab_size=vocab))
    root = args.remote_root.strip("/")
    for target in targets:
        target.remote = f"{root}/{target.remote}" if root else target.remote
    return targets


# ----------------------------------------------------------------------------- checks and transfer


def problems(path: Path, target: Target) -> list[str]:
    """Why `path` is not a good copy of `target` (empty list: it is)."""
    if not path.is_file():
        return ["missing"]
    found: list[str] = []
    if target.size is not None and path.stat().st_size != target.size:
        found.append(f"{path.stat().st_size} bytes, the hub has {target.size}")
    try:
        if target.kind == "shard":
            count = tg().read_shard_header(path)
            if target.tokens is not None and count != target.tokens:
                found.append(f"{count} tokens, the manifest implies {target.tokens}")
        elif target.kind == "model":
            tg().load_tokenizer(path, target.vocab_size)
        elif target.kind == "vocab":
            lines = path.read_text(encoding="utf-8").count("\n")
            if target.vocab_size and lines != target.vocab_size:
                found.append(f"{lines} vocabulary lines, expected {target.vocab_size}")
    except (tg().DataError, RuntimeError, UnicodeDecodeError) as exc:
        found.append(str(exc))
    if (
        not found
        and target.kind in ("model", "vocab")
        and target.sha256
        and sha256_file(path) != target.sha256
    ):
        found.append("sha256 differs from the hub's")
    return found


def ensure(target: Target, source, staging: Path) -> str:
    """Make the local file good; return what was done ("present", "downloaded", "redone: why")."""
    before = problems(target.local, target)
    if not before:
        return "present"
    staged = source.fetch(target.remote, staging, force=False)
    after = problems(staged, target)
    if after:  # a stale or damaged copy in the staging area: fetch it from scratch once more
        staged.unlink(missing_ok=True)
        staged = source.fetch(target.remote, staging, force=True)
        after = problems(staged, target)
    if after:
        staged.unlink(missing_ok=True)
        fail(f"{target.remote} from {source} is bad even after a fresh download: {'; '.join(after)}")
    target.local.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staged, target.local)
    return "downloaded" if before == ["missing"] else f"redone ({'; '.join(before)})"


def load_manifest(args: argparse.Namespace, source, staging: Path) -> dict:
    saved = args.local_dir / "datasets" / dataset_name(args.variant) / LOCAL_MANIFEST
    if args.skip_manifest:
        if not saved.is_file():
            fail(f"{saved} not found; run once without --skip-manifest to fetch the manifest")
        path = saved
    else:
        root = args.remote_root.strip("/")
        path = source.fetch(f"{root}/manifest.json" if root else "manifest.json", staging, force=False)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        fail(f"{path}: manifest is not valid JSON ({exc}); run again without --skip-manifest")
    if path != saved:
        saved.parent.mkdir(parents=True, exist_ok=True)
        write_json(saved, manifest)
    return manifest


def download(args: argparse.Namespace) -> dict[str, int]:
    """Fetch everything the plan lists; return counts of what happened."""
    source = make_source(args)
    staging = args.local_dir / "datasets" / ".staging"
    tg()  # import once before the worker threads start
    targets = plan(load_manifest(args, source, staging), args, source)
    info = source.file_info([t.remote for t in targets])
    for target in targets:
        target.size, target.sha256 = info.get(target.remote, (None, None))
    counts = {"present": 0, "downloaded": 0, "redone": 0}
    errors = []
    bar = tqdm(total=len(targets), unit="file", desc=dataset_name(args.variant), disable=args.no_progress)
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        futures = {pool.submit(ensure, t, source, staging): t for t in targets}
        for future in as_completed(futures):
            try:
                outcome = future.result()
            except (tg().DataError, OSError) as exc:
                errors.append(str(exc))
            else:
                counts[outcome.split(" ")[0]] += 1
                if outcome.startswith("redone"):
                    tqdm.write(f"{futures[future].local}: {outcome}")
            bar.update(1)
    bar.close()
    if errors:
        fail(f"{len(errors)} of {len(targets)} files failed (run again to resume):\n  " + "\n  ".join(errors))
    shutil.rmtree(staging, ignore_errors=True)  # nothing left to resume
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    counts = download(args)
    folder = args.local_dir / "datasets" / dataset_name(args.variant)
    print(
        f"{folder}: {counts['downloaded']} downloaded, {counts['redone']} redone, "
        f"{counts['present']} already present and verified ({time.perf_counter() - start:.1f}s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
