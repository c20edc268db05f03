"""Public datasets the source papers use, fetched on demand (``heist data fetch NAME``).

Heist runs offline on its bundled photo corpus (:mod:`translators.corpus`); these are for real work
where the network is available. Each :class:`DatasetSpec` records the canonical URL, the archive size
and checksums **only where a published value was found** (the ``checksum_source`` field says where);
unknown values are ``None``, and such downloads are verified by size/checksum only when known. The
sha256 of every download is computed anyway and written to the dataset's marker file so a user can pin it.

Layout under the destination folder (default :func:`translators.paths.datasets_dir`)::

    DEST/.downloads/ARCHIVE(.part)     the archive while downloading (deleted after extraction)
    DEST/NAME/...                      the extracted files
    DEST/NAME/.heist-dataset.json      written last: name, url, sha256, file count (= "fetched")

URLs: ``url=`` overrides one fetch; ``HEIST_DATASETS_MIRROR=BASE`` makes every fetch use
``BASE/ARCHIVE`` (the expected checksums still apply: a mirror must serve identical files).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import httpx
from pydantic import BaseModel, ConfigDict, Field

from translators.download import DownloadError, ProgressFn, download, extract_archive, part_path
from translators.errors import HeistError
from translators.files import atomic_write_json, unusable_folder_reason
from translators.paths import datasets_dir

log = logging.getLogger(__name__)

MIRROR_ENV = "HEIST_DATASETS_MIRROR"
MARKER = ".heist-dataset.json"


class DatasetError(HeistError):
    """An unknown dataset name, a dataset that is not fetched yet, or an unknown subset."""

    code = "bad_dataset"


class DatasetSpec(BaseModel):
    """One downloadable dataset archive.

    ``subsets`` maps a subset name to a folder inside the extracted archive; ``default_subset`` is what
    ``dataset:NAME`` means in an images spec. ``size`` is in bytes.
    """

    model_config = ConfigDict(frozen=True)

    name: str
    title: str
    url: str
    filename: str
    size: int | None = None
    sha256: str | None = None
    md5: str | None = None
    checksum_source: str = ""
    subsets: dict[str, str]
    default_subset: str
    images: int | None = Field(None, description="image count of the default subset, when documented")
    used_by: str = ""
    homepage: str = ""
    license: str = ""

    def folder(self, dest: Path | None = None) -> Path:
        """Where the archive is extracted: ``DEST/NAME``."""
        return (dest or datasets_dir()) / self.name

    def archive_path(self, dest: Path | None = None) -> Path:
        return (dest or datasets_dir()) / ".downloads" / self.filename

    def is_fetched(self, dest: Path | None = None) -> bool:
        return (self.folder(dest) / MARKER).is_file()

    @property
    def checksum_kind(self) -> str:
        """``sha256``, ``md5`` or ``none``: the strongest published checksum we verify against."""
        return "sha256" if self.sha256 else "md5" if self.md5 else "none"


_TFDS_DIV2K = "TensorFlow Datasets url_checksums/div2k.txt (sha256, size); torchSR div2k.py (md5)"

DATASETS: dict[str, DatasetSpec] = {
    d.name: d
    for d in (
        DatasetSpec(
            name="div2k-train-hr",
            title="DIV2K training set, high resolution (800 PNG, 2K)",
            url="https://data.vision.ee.ethz.ch/cvl/DIV2K/DIV2K_train_HR.zip",
            filename="DIV2K_train_HR.zip",
            size=3530603713,
            sha256="9d0b9c463f6e35b6c62cc6a930ee2224f670b34c1df841a57670f9acf0f6c335",
            md5="bdc2d9338d4e574fe81bf7d158758658",
            checksum_source=_TFDS_DIV2K,
            subsets={"hr": "DIV2K_train_HR"},
            default_subset="hr",
            images=800,
            used_by="SR victims and surrogates (SRResNet training)",
            homepage="https://data.vision.ee.ethz.ch/cvl/DIV2K/",
            license="research use (see homepage)",
        ),
        DatasetSpec(
            name="div2k-valid-hr",
            title="DIV2K validation set, high resolution (100 PNG, 2K)",
            url="https://data.vision.ee.ethz.ch/cvl/DIV2K/DIV2K_valid_HR.zip",
            filename="DIV2K_valid_HR.zip",
            size=448993893,
            sha256="20dd31fd84d777bc1cf5d6b7654a3f569c0aec74458ae094122ad1d0489900fc",
            md5="9fcdda83005c5e5997799b69f955ff88",
            checksum_source=_TFDS_DIV2K,
            subsets={"hr": "DIV2K_valid_HR"},
            default_subset="hr",
            images=100,
            used_by="SR evaluation (victim-test set)",
            homepage="https://data.vision.ee.ethz.ch/cvl/DIV2K/",
            license="research use (see homepage)",
        ),
        DatasetSpec(
            name="set5",
            title="Set5 (Bevilacqua et al. 2012), HR images",
            url="https://huggingface.co/datasets/eugenesiow/Set5/resolve/main/data/Set5_HR.tar.gz",
            filename="Set5_HR.tar.gz",
            subsets={"hr": "Set5_HR"},
            default_subset="hr",
            images=5,
            used_by="SR benchmark (independent benchmark set)",
            homepage="https://huggingface.co/datasets/eugenesiow/Set5",
        ),
        DatasetSpec(
            name="set14",
            title="Set14 (Zeyde et al. 2010), HR images",
            url="https://huggingface.co/datasets/eugenesiow/Set14/resolve/main/data/Set14_HR.tar.gz",
            filename="Set14_HR.tar.gz",
            subsets={"hr": "Set14_HR"},
            default_subset="hr",
            images=14,
            used_by="SR benchmark (independent benchmark set)",
            homepage="https://huggingface.co/datasets/eugenesiow/Set14",
        ),
        DatasetSpec(
            name="bsd100",
            title="BSD100 (Martin et al. 2001), HR images",
            url="https://huggingface.co/datasets/eugenesiow/BSD100/resolve/main/data/BSD100_HR.tar.gz",
            filename="BSD100_HR.tar.gz",
            subsets={"hr": "BSD100_HR"},
            default_subset="hr",
            images=100,
            used_by="SR benchmark; denoising benchmark",
            homepage="https://www2.eecs.berkeley.edu/Research/Projects/CS/vision/bsds/",
            license="non-commercial research and education (see homepage)",
        ),
        DatasetSpec(
            name="urban100",
            title="Urban100 (Huang et al. 2015), HR images",
            url="https://huggingface.co/datasets/eugenesiow/Urban100/resolve/main/data/Urban100_HR.tar.gz",
            filename="Urban100_HR.tar.gz",
            md5="65d9d84a34b72c6f7ca1e26a12df1e4c",
            checksum_source="deepinv (md5 passed to torchvision download_and_extract_archive)",
            subsets={"hr": "Urban100_HR"},
            default_subset="hr",
            images=100,
            used_by="SR benchmark (independent benchmark set)",
            homepage="https://huggingface.co/datasets/eugenesiow/Urban100",
        ),
        DatasetSpec(
            name="sr-benchmark",
            title="EDSR benchmark bundle: Set5, Set14, B100, Urban100 (HR + bicubic LR x2/x3/x4)",
            url="https://cv.snu.ac.kr/research/EDSR/benchmark.tar",
            filename="benchmark.tar",
            md5="4ace41d33c2384b97e6b320cd0afd6ba",
            checksum_source="torchSR benchmarks.py (md5)",
            subsets={
                "set5": "benchmark/Set5/HR",
                "set14": "benchmark/Set14/HR",
                "b100": "benchmark/B100/HR",
                "urban100": "benchmark/Urban100/HR",
            },
            default_subset="set5",
            images=5,
            used_by="SR benchmarks in one archive (about 250 MB)",
            homepage="https://github.com/sanghyun-son/EDSR-PyTorch",
        ),
        DatasetSpec(
            name="monet2photo",
            title="CycleGAN monet2photo (A: Monet paintings, B: photos)",
            url="https://efrosgans.eecs.berkeley.edu/cyclegan/datasets/monet2photo.zip",
            filename="monet2photo.zip",
            size=305231073,
            sha256="88f91b00fc228f97c9411fbf1880ec1d119c98f1722e4cfcfaa2fb35fac05b04",
            checksum_source="TensorFlow Datasets url_checksums/cycle_gan.txt (recorded for the same file at "
            "the former people.eecs.berkeley.edu/~taesung_park/CycleGAN/datasets/ address)",
            subsets={
                "trainA": "monet2photo/trainA",
                "trainB": "monet2photo/trainB",
                "testA": "monet2photo/testA",
                "testB": "monet2photo/testB",
            },
            default_subset="testB",
            images=751,
            used_by="style transfer (paper 1: photo -> Monet; victim inputs are photos, B)",
            homepage="https://github.com/junyanz/pytorch-CycleGAN-and-pix2pix",
        ),
        DatasetSpec(
            name="facades",
            title="pix2pix CMP Facades (256x512 side-by-side pairs; train 400, val 100, test 106)",
            url="https://efrosgans.eecs.berkeley.edu/pix2pix/datasets/facades.tar.gz",
            filename="facades.tar.gz",
            subsets={"train": "facades/train", "val": "facades/val", "test": "facades/test"},
            default_subset="test",
            images=106,
            used_by="membership inference and AKD (paper 3: train = members, val = proxy set, test = non-members)",
            homepage="https://cmp.felk.cvut.cz/~tylecr1/facade/",
        ),
    )
}


def _is_hex(value: str, length: int) -> bool:
    return len(value) == length and all(c in "0123456789abcdefABCDEF" for c in value)


def get_dataset(name: str) -> DatasetSpec:
    """The :class:`DatasetSpec` called ``name`` (case-insensitive); :class:`DatasetError` names the known ones."""
    spec = DATASETS.get(name.lower())
    if spec is None:
        raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}")
    return spec


def resolve_url(spec: DatasetSpec, url: str | None = None) -> str:
    """``url`` if given, else ``$HEIST_DATASETS_MIRROR/<archive name>`` if set, else the canonical URL."""
    if url:
        return url
    mirror = os.environ.get(MIRROR_ENV, "").strip()
    if mirror:
        return f"{mirror.rstrip('/')}/{spec.filename}"
    return spec.url


class FetchResult(BaseModel):
    """What :func:`fetch` did. ``verified`` is the checksum that was checked (``none`` if none was known)."""

    name: str
    folder: Path
    images_dir: Path
    url: str
    sha256: str
    verified: str
    files: int
    already_present: bool = False


def _read_marker(folder: Path) -> dict[str, object]:
    try:
        data = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _images_dir(spec: DatasetSpec, folder: Path, subset: str | None) -> Path:
    key = subset or spec.default_subset
    if key not in spec.subsets:
        raise DatasetError(f"dataset {spec.name} has no subset {key!r}; subsets: {', '.join(spec.subsets)}")
    path = folder / spec.subsets[key]
    if path.is_dir():
        return path
    # A mirror's re-packed archive may name its single top-level folder differently: accept that folder.
    entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
    if len(spec.subsets) == 1 and len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    raise DatasetError(f"{folder}: expected folder {spec.subsets[key]!r} is missing from the extracted archive")


def dataset_images_dir(name: str, subset: str | None = None, dest: Path | None = None) -> Path:
    """Folder of images of a fetched dataset (``subset`` defaults to the spec's ``default_subset``)."""
    spec = get_dataset(name)
    folder = spec.folder(dest)
    if not spec.is_fetched(dest):
        raise DatasetError(
            f"dataset {spec.name} is not fetched into {folder.parent}; run: heist data fetch {spec.name}"
        )
    return _images_dir(spec, folder, subset)


def _swap_in(new: Path, folder: Path) -> None:
    """Replace ``folder`` (if any) by the complete folder ``new``; the old copy is deleted only afterwards."""
    old = folder.with_name(f".{folder.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if folder.exists():
        os.replace(folder, old)
    os.replace(new, folder)
    shutil.rmtree(old, ignore_errors=True)


def fetch(
    name: str,
    dest: str | os.PathLike[str] | None = None,
    *,
    url: str | None = None,
    sha256: str | None = None,
    verify: bool = True,
    force: bool = False,
    keep_archive: bool = False,
    progress: ProgressFn | None = None,
    client: httpx.Client | None = None,
    retries: int = 5,
    backoff_s: float = 1.0,
) -> FetchResult:
    """Download, verify and extract dataset ``name`` into ``dest/NAME`` (resumable; idempotent).

    Args:
        url: download from here instead (the spec's checksums still apply unless ``sha256`` is given).
        sha256: expected sha256, overriding the spec's checksums (for a mirror with a re-packed archive).
        verify: if False, skip size and checksum checks (logged as a warning).
        force: fetch again from the server (a kept archive is not reused); an existing complete copy is
            replaced only once the new one is downloaded, verified and extracted.
        keep_archive: keep ``dest/.downloads/ARCHIVE`` after extraction.
        retries, backoff_s: see :func:`translators.download.download`.
    """
    spec = get_dataset(name)
    if sha256 is not None and not _is_hex(sha256, 64):
        raise DatasetError(f"--sha256 must be 64 hexadecimal characters, got {sha256!r}")
    root = Path(dest).expanduser() if dest is not None else datasets_dir()
    if (why := unusable_folder_reason(root)) is not None:
        raise DatasetError(f"--dest {root}: {why}")
    folder = spec.folder(root)
    if spec.is_fetched(root) and not force:
        marker = _read_marker(folder)
        return FetchResult(name=spec.name, folder=folder, images_dir=_images_dir(spec, folder, None),
                           url=str(marker.get("url", "")), sha256=str(marker.get("sha256", "")),
                           verified=str(marker.get("verified", "none")), files=int(str(marker.get("files", 0))),
                           already_present=True)
    replacing = force and spec.is_fetched(root)  # the good copy stays until the new one is complete
    if folder.exists() and not replacing:
        log.info("removing incomplete copy %s", folder)
        shutil.rmtree(folder)
    source = resolve_url(spec, url)
    archive = spec.archive_path(root)
    if force:  # "fetch again" means from the server, not from an archive kept by --keep-archive
        archive.unlink(missing_ok=True)
    if sha256:
        expect_size, expect_sha, expect_md5 = None, sha256, None
    elif verify:
        expect_size, expect_sha, expect_md5 = spec.size, spec.sha256, spec.md5
    else:
        log.warning("checksum verification disabled for %s", spec.name)
        expect_size, expect_sha, expect_md5 = None, None, None
    verified = "sha256" if expect_sha else "md5" if expect_md5 else "none"
    if verified == "none":
        log.warning("no published checksum for %s: the download is not verified (its sha256 is recorded)", spec.name)
    if archive.exists() and (expect_sha or expect_md5):
        # A complete archive from an earlier run that died during extraction: re-verify it before trusting it.
        archive.rename(part_path(archive))
    _, digest = download(source, archive, size=expect_size, sha256=expect_sha, md5=expect_md5,
                         progress=progress, client=client, retries=retries, backoff_s=backoff_s)
    staging = folder.with_name(f".{folder.name}.new")
    if staging.exists():
        shutil.rmtree(staging)
    try:
        extract_archive(archive, staging)
    except DownloadError:
        archive.unlink(missing_ok=True)  # unsafe or corrupt: never extract it again on the next run
        raise
    files = sum(1 for f in staging.rglob("*") if f.is_file())
    marker = {"name": spec.name, "url": source, "sha256": digest, "verified": verified, "files": files,
              "archive": spec.filename}
    atomic_write_json(staging / MARKER, marker, durable=False)
    _swap_in(staging, folder)
    if not keep_archive:
        archive.unlink()
    result = FetchResult(name=spec.name, folder=folder, images_dir=_images_dir(spec, folder, None), url=source,
                         sha256=digest, verified=verified, files=files)
    log.info("fetched %s: %d files in %s (sha256 %s, verified: %s)", spec.name, files, folder, digest, verified)
    return result
