"""Every real-dataset adapter, end to end on tiny archives in the dataset's real layout, served over HTTP:
download -> scan -> manifest -> synthesize gives the expected images, identities and cameras."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from dataset_fixtures import (
    Built,
    LocalServer,
    build_caviar,
    build_cuhk03,
    build_custom_folder,
    build_market,
    build_viper,
    http_server,
    make_params,
)
from PIL import Image

from tasks import download, manifest, synthesize
from tasks.config import Params, SourceConfig, load_params
from tasks.datasets import RawImage, get_adapter
from tasks.datasets.acquire import ChecksumError, DownloadError
from tasks.datasets.base import DatasetError
from tasks.evaluation.scoring import row_names
from tests.micro_project import REPO

__all__ = ["http_server"]


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stages run in the project folder: the custom adapter's file-hash cache (.cache/) goes to the test's own."""
    monkeypatch.chdir(tmp_path)


def served_params(tmp: Path, server: LocalServer, name: str, built: Built, **protocol: object) -> Params:
    url = server.serve(f"/{built.filename}", built.data)
    return make_params(tmp, name, {name: SourceConfig(url=url, md5=built.md5, filename=built.filename)},
                       **protocol)


def acquire_and_scan(params: Params) -> list[RawImage]:
    download.run(params, params.raw_dir())
    return list(get_adapter(params.dataset.name).scan(params.raw_dir()))


def run_stages(params: Params) -> tuple[dict[str, int], dict[str, int], list[dict]]:
    counts = manifest.run(params, params.raw_dir(), params.manifest_path(), params.quarantine_path())
    summary = synthesize.run(params, params.raw_dir(), params.manifest_path(), params.lr_dir(),
                             params.mlr_manifest_path())
    return counts, summary, pq.read_table(params.mlr_manifest_path()).to_pylist()


def check_mlr(params: Params, rows: list[dict], test_ids: int) -> None:
    """The MLR manifest of trial 0: queries are view-1 LR images, one HR gallery image per test id."""
    trial = [r for r in rows if r["trial"] == 0]
    queries = [r for r in trial if r["role"] == "query" and r["query_set"] == "mlr"]
    gallery = [r for r in trial if r["role"] == "gallery"]
    train_ids = {r["person_id"] for r in trial if r["role"] == "train"}
    assert len(gallery) == test_ids == len({r["person_id"] for r in gallery})
    assert {r["person_id"] for r in queries} == {r["person_id"] for r in gallery}
    assert not train_ids & {r["person_id"] for r in gallery}
    lr_root = params.lr_dir().resolve()
    for r in queries:
        assert r["rate"] in params.protocol.train_rates
        lr = Path(r["path"]).resolve()
        assert lr.is_file() and lr.is_relative_to(lr_root)


def test_viper(http_server: LocalServer, tmp_path: Path) -> None:
    built = build_viper(persons=6, unpaired=1)
    # the paper's 316 of 632 is the default; 3 of these 6 is the same half
    params = served_params(tmp_path, http_server, "viper", built, test_identities=3)
    images = acquire_and_scan(params)
    assert len(images) == built.images == 12
    by_pid: dict[int, list[RawImage]] = {}
    for img in images:
        by_pid.setdefault(img.person_id, []).append(img)
    assert sorted(by_pid) == list(range(6))  # the number before the underscore; unpaired 006 dropped
    for pid, pair in by_pid.items():
        assert sorted((i.camera_id, i.view) for i in pair) == [(0, 0), (1, 1)]
        cam_a = next(i for i in pair if i.camera_id == 0)
        assert cam_a.path.split("/")[-2] == "cam_a" and cam_a.path.split("/")[-1].startswith(f"{pid:03d}_")
    counts, summary, rows = run_stages(params)
    assert counts["images"] == 12 and counts["quarantined"] == 0 and counts["identities"] == 6
    assert summary["test_identities"] == 3
    check_mlr(params, rows, 3)


def test_caviar_drops_identities_seen_by_one_camera(tmp_path: Path) -> None:
    built = build_caviar(both=4, close_only=2, per_camera=3)
    zip_path = tmp_path / "CAVIAR4REID.zip"
    zip_path.write_bytes(built.data)
    # No known md5 upstream: a file:// source with the md5 set is downloaded like any other.
    params = make_params(tmp_path, "caviar", {"caviar": SourceConfig(url=zip_path.as_uri(), md5=built.md5,
                                                                     filename="CAVIAR4REID.zip")},
                         test_identities=2)  # the paper's 25 of 50 is the default; these are 4
    images = acquire_and_scan(params)
    assert len(images) == built.images == 24
    assert {i.person_id for i in images} == {1, 2, 3, 4}
    for img in images:
        number = int(Path(img.path).stem[4:])
        assert img.camera_id == img.view == (0 if number <= 10 else 1)
    counts, _summary, rows = run_stages(params)
    assert counts == {"images": 24, "quarantined": 0, "identities": 4}
    # CAVIAR is genuinely low resolution: the headline queries are the distant camera's images as they are.
    queries = [r for r in rows if r["trial"] == 0 and r["role"] == "query"]
    gallery = [r for r in rows if r["trial"] == 0 and r["role"] == "gallery"]
    assert queries and {r["query_set"] for r in queries} == {"native"}  # no HR copy, no unseen rate
    for r in queries:
        assert r["path"] == r["hr_path"] and r["camera_id"] == 1 and r["rate"] == 1
        assert int(Path(r["path"]).stem[4:]) > 10  # images 11-20: the distant camera
    assert {r["person_id"] for r in queries} == {r["person_id"] for r in gallery} and len(gallery) == 2
    assert not list(params.lr_dir().rglob("*_r8.png"))  # nothing down-sampled for queries that are not used
    assert list(row_names(queries, params.protocol.unseen_rates)) == ["lr"]


def test_caviar_without_md5_is_not_downloaded_but_a_placed_file_is_used(http_server: LocalServer,
                                                                        tmp_path: Path) -> None:
    built = build_caviar()
    url = http_server.serve("/CAVIAR4REID.zip", built.data)
    params = make_params(tmp_path, "caviar", {"caviar": SourceConfig(url=url, filename="CAVIAR4REID.zip")})
    with pytest.raises(DownloadError, match="md5 is empty"):
        download.run(params, params.raw_dir())
    assert http_server.hits["/CAVIAR4REID.zip"] == 0
    placed = params.downloads_dir() / "CAVIAR4REID.zip"
    placed.write_bytes(built.data)
    assert len(acquire_and_scan(params)) == built.images


def test_market1501(http_server: LocalServer, tmp_path: Path) -> None:
    built = build_market()
    params = served_params(tmp_path, http_server, "market1501", built, test_identities=2)  # 750 by default
    images = acquire_and_scan(params)
    assert len(images) == built.images == 11
    assert {i.person_id for i in images} == {2, 7, 11, 15}  # -1 (junk) and 0 (distractors) dropped
    assert {i.camera_id for i in images} == built.cameras
    assert not any("gt_bbox" in i.path for i in images)
    for img in images:
        camera = int(img.path.split("_c")[1][0])  # c1..c6
        assert (img.camera_id, img.camera_pair, img.view) == (camera - 1, (camera - 1) // 2, (camera - 1) % 2)
    counts, _summary, rows = run_stages(params)
    assert counts == {"images": 11, "quarantined": 0, "identities": 4}
    check_mlr(params, rows, 2)


def test_cuhk03_needs_the_zip_put_in_place_then_extracts_the_mat(tmp_path: Path) -> None:
    built = build_cuhk03(tmp_path)
    params = make_params(tmp_path, "cuhk03", {"cuhk03": SourceConfig(url="", md5=built.md5,
                                                                     filename="cuhk03_release.zip")},
                         test_identities=3)
    expected = (params.downloads_dir() / "cuhk03_release.zip").resolve()
    with pytest.raises(DownloadError) as info:
        download.run(params, params.raw_dir())
    assert str(expected) in str(info.value)

    expected.parent.mkdir(parents=True, exist_ok=True)
    damaged = bytearray(built.data)
    damaged[len(damaged) // 2] ^= 0xFF
    expected.write_bytes(bytes(damaged))  # a damaged copy: md5 checked, and named
    with pytest.raises(ChecksumError, match=built.md5):
        download.run(params, params.raw_dir())

    expected.write_bytes(built.data)
    images = acquire_and_scan(params)
    assert len(images) == built.images
    stored = built.extra["stored"]["labeled"]  # type: ignore[index]
    ids = {i.person_id for i in images}
    assert len(ids) == built.identities  # unique across the 5 camera pairs
    assert {i.camera_id for i in images} == built.cameras
    for img in images:
        pair, person = divmod(img.person_id, 1000)
        assert img.camera_pair == pair and img.camera_id == 2 * pair + img.view
        column = int(Path(img.path).stem.split("_")[3]) - 1
        assert img.view == (0 if column < 5 else 1)
        on_disk = np.asarray(Image.open(params.raw_dir() / img.path))
        assert np.array_equal(on_disk, stored[(pair, person, column)])  # (3, W, H) -> (H, W, 3) undone right
    assert not list(params.downloads_dir().glob(".cuhk03-*"))  # the extracted .mat is not kept
    counts, summary, rows = run_stages(params)
    assert counts["images"] == built.images and counts["quarantined"] == 0
    assert summary["test_identities"] == 3
    check_mlr(params, rows, 3)


def test_cuhk03_tests_on_the_papers_100_identities_by_default(tmp_path: Path) -> None:
    built = build_cuhk03(tmp_path, persons=(21, 21, 21, 21, 21))  # 105 identities, each in both views
    params = make_params(tmp_path, "cuhk03", {"cuhk03": SourceConfig(url="", md5=built.md5,
                                                                     filename="cuhk03_release.zip")})
    assert params.protocol.test_identities == 0  # not set: the adapter's paper split
    (params.downloads_dir()).mkdir(parents=True)
    (params.downloads_dir() / "cuhk03_release.zip").write_bytes(built.data)
    download.run(params, params.raw_dir())
    _, summary, rows = run_stages(params)
    assert summary["test_identities"] == 100
    check_mlr(params, rows, 100)


def test_cuhk03_detected_images(tmp_path: Path) -> None:
    built = build_cuhk03(tmp_path)
    placed = tmp_path / "data" / "downloads" / "cuhk03_release.zip"
    placed.parent.mkdir(parents=True)
    placed.write_bytes(built.data)
    params = make_params(tmp_path, "cuhk03-detected",
                         {"cuhk03": SourceConfig(md5=built.md5, filename="cuhk03_release.zip")})
    images = acquire_and_scan(params)
    stored = built.extra["stored"]["detected"]  # type: ignore[index]
    first = images[0]
    pair, person = divmod(first.person_id, 1000)
    column = int(Path(first.path).stem.split("_")[3]) - 1
    assert first.path.startswith("detected/")
    on_disk = np.asarray(Image.open(params.raw_dir() / first.path))
    assert np.array_equal(on_disk, stored[(pair, person, column)])


def test_custom_table(tmp_path: Path) -> None:
    table, _bad = build_custom_folder(tmp_path / "mine", images=40, corrupt=0, fmt="PNG")
    params = make_params(tmp_path, "custom", {"custom": SourceConfig(url=str(table))})
    images = acquire_and_scan(params)
    assert len(images) == 40 and {i.person_id for i in images} == set(range(10))
    assert all(Path(i.path).is_absolute() and Path(i.path).is_file() for i in images)
    assert Counter(i.view for i in images) == {0: 20, 1: 20}  # default view = camera_id % 2
    assert [p.name for p in params.raw_dir().iterdir()] == ["custom.parquet"]  # no image copied
    counts = manifest.run(params, params.raw_dir(), params.manifest_path(), params.quarantine_path())
    assert counts == {"images": 40, "quarantined": 0, "identities": 10}


def test_custom_synthesis_writes_only_under_lr_dir(tmp_path: Path) -> None:
    table, _ = build_custom_folder(tmp_path / "mine", images=40, corrupt=0, fmt="PNG")
    params = make_params(tmp_path, "custom", {"custom": SourceConfig(url=str(table))})
    acquire_and_scan(params)
    before = sorted((tmp_path / "mine").rglob("*"))
    _, _, rows = run_stages(params)
    assert sorted((tmp_path / "mine").rglob("*")) == before  # the user's folder is left alone
    check_mlr(params, rows, 5)


def test_custom_parquet_with_explicit_pairs(tmp_path: Path) -> None:
    import pyarrow as pa

    table, _ = build_custom_folder(tmp_path / "mine", images=8, corrupt=0, fmt="PNG")
    lines = table.read_text().splitlines()[1:]
    rows = [dict(zip(["path", "person_id", "camera_id"], line.split(","), strict=True)) for line in lines]
    pq.write_table(pa.Table.from_pylist([{"path": r["path"], "person_id": int(r["person_id"]),
                                          "camera_id": int(r["camera_id"]) + 2, "camera_pair": 7,
                                          "view": 1 - int(r["camera_id"])} for r in rows]),
                   tmp_path / "mine" / "t.parquet")
    source = SourceConfig(url=str(tmp_path / "mine" / "t.parquet"))
    params = make_params(tmp_path, "custom", {"custom": source})
    images = acquire_and_scan(params)
    assert {(i.camera_id, i.camera_pair, i.view) for i in images} == {(2, 7, 1), (3, 7, 0)}


@pytest.mark.parametrize(("header", "row", "message"), [
    ("path,person_id", "imgs/0000.jpg,1", "missing column(s) camera_id"),
    ("path,person_id,camera_id,cam_pair", "imgs/0000.jpg,1,0,0", "unknown column(s) cam_pair"),
    ("path,person_id,camera_id", "imgs/0000.jpg,one,0", "row 2, column person_id: 'one' is not an integer"),
    ("path,person_id,camera_id", "imgs/0000.jpg,1,-1", "row 2, column camera_id: -1 is out of range"),
    ("path,person_id,camera_id,view", "imgs/0000.jpg,1,0,2", "row 2, column view: 2 is out of range"),
    ("path,person_id,camera_id", "imgs/absent.jpg,1,0",
     "row 2, column path: 'imgs/absent.jpg': no such file"),
    ("path,person_id,camera_id", "imgs/0001.jpg,1,0",
     "row 2, column path: 'imgs/0001.jpg': same file as row 1"),
])
def test_custom_table_errors_name_file_row_and_column(tmp_path: Path, header: str, row: str,
                                                      message: str) -> None:
    build_custom_folder(tmp_path / "mine", images=4, corrupt=0)
    table = tmp_path / "mine" / "bad.csv"
    table.write_text(f"{header}\n{'imgs/0001.jpg,1,0' + (',0' if header.count(',') == 3 else '')}\n{row}\n")
    params = make_params(tmp_path, "custom", {"custom": SourceConfig(url=str(table))})
    with pytest.raises(DatasetError) as info:
        download.run(params, params.raw_dir())
    assert str(table) in str(info.value) and message in str(info.value)


def test_a_hard_link_to_a_listed_image_is_refused_as_the_same_file_naming_both_rows(tmp_path: Path) -> None:
    # Issue 28, item 8: compared by path, a hard link was accepted as a second image (one image in two splits).
    import os

    build_custom_folder(tmp_path / "mine", images=4, corrupt=0)
    os.link(tmp_path / "mine" / "imgs" / "0001.jpg", tmp_path / "mine" / "imgs" / "linked.jpg")
    table = tmp_path / "mine" / "bad.csv"
    # Valid but for the link: two people in both views.
    table.write_text("path,person_id,camera_id\nimgs/0000.jpg,0,0\nimgs/0001.jpg,0,1\nimgs/0002.jpg,1,0\n"
                     "imgs/linked.jpg,1,1\n")
    params = make_params(tmp_path, "custom", {"custom": SourceConfig(url=str(table))})
    with pytest.raises(DatasetError) as info:
        download.run(params, params.raw_dir())
    assert "row 4, column path: 'imgs/linked.jpg': same file as row 2 ('imgs/0001.jpg': a hard link to it)" in \
        str(info.value), str(info.value)


def test_sources_are_read_from_params_only(tmp_path: Path) -> None:
    # params.yaml `sources` is the one place a url/md5 is written: every adapter that downloads has an
    # entry in the repository's params.yaml, and with none in params it refuses by key instead of
    # falling back to a copy of its own.
    sources = load_params(REPO / "params.yaml").sources
    for name in ("viper", "cuhk03", "caviar", "market1501", "custom"):
        assert name in sources, name
    for name, key in (("viper", "viper"), ("cuhk03-detected", "cuhk03"), ("market1501", "market1501")):
        with pytest.raises(DownloadError, match=rf"params\.yaml has no sources\.{key}:"):
            download.run(make_params(tmp_path, name), tmp_path / "raw" / name)


def test_custom_needs_a_table(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"sources\.custom\.url"):
        download.run(make_params(tmp_path, "custom"), tmp_path / "raw")


@pytest.mark.parametrize("name", ["viper", "caviar", "market1501", "cuhk03"])
def test_scan_of_an_empty_raw_folder_says_what_to_do(tmp_path: Path, name: str) -> None:
    (tmp_path / "raw").mkdir()
    with pytest.raises(DatasetError, match="download stage"):
        list(get_adapter(name).scan(tmp_path / "raw"))


def _custom_table(tmp_path: Path, rows: list[str], header: str = "path,person_id,camera_id") -> Path:
    """A table over build_custom_folder's 8 images (imgs/0000.jpg ... imgs/0007.jpg) with the given rows."""
    build_custom_folder(tmp_path / "mine", images=8, corrupt=0)
    table = tmp_path / "mine" / "t.csv"
    table.write_text("\n".join([header, *rows]) + "\n")
    return table


def _custom_error(tmp_path: Path, table: Path) -> str:
    params = make_params(tmp_path, "custom", {"custom": SourceConfig(url=str(table))})
    with pytest.raises(DatasetError) as info:
        download.run(params, params.raw_dir())
    return str(info.value)


@pytest.mark.parametrize(("cameras", "found"), [([0] * 8, "view 0 (camera_id found: 0)"),
                                                ([0, 2] * 4, "view 0 (camera_id found: 0, 2)"),
                                                ([1, 3] * 4, "view 1 (camera_id found: 1, 3)")])
def test_a_custom_table_with_one_view_says_so_and_what_is_needed(tmp_path: Path, cameras: list[int],
                                                                 found: str) -> None:
    # Reproduced: it used to fail in the synthesize stage naming protocol.test_identities.
    table = _custom_table(tmp_path, [f"imgs/{i:04d}.jpg,{i // 2},{c}" for i, c in enumerate(cameras)])
    message = _custom_error(tmp_path, table)
    assert message.startswith(f"{table}: all 8 images are in {found}; the MLR protocol needs the same people in "
                              f"two views: images from two cameras"), message
    assert "\n" not in message


def test_a_custom_table_with_one_person_in_both_views_says_so(tmp_path: Path) -> None:
    # person 0 in both cameras; 1, 2, 3 in camera 0 only
    rows = ["imgs/0000.jpg,0,0", "imgs/0001.jpg,0,1"] + [f"imgs/{i:04d}.jpg,{i // 2},0" for i in range(2, 8)]
    message = _custom_error(tmp_path, _custom_table(tmp_path, rows))
    assert "1 person (person_id 0) seen in both views (camera_id found: 0, 1)" in message
    assert message.endswith("for at least 2 people (one to train on, one to test)")


def test_two_people_in_both_views_are_enough_for_the_adapter(tmp_path: Path) -> None:
    rows = [f"imgs/{i:04d}.jpg,{i // 4},{i % 2}" for i in range(8)]
    params = make_params(tmp_path, "custom", {"custom": SourceConfig(url=str(_custom_table(tmp_path, rows)))})
    download.run(params, params.raw_dir())
    assert len(list(get_adapter("custom").scan(params.raw_dir()))) == 8


@pytest.mark.parametrize(("row", "problem"), [
    ("imgs/0001.jpg,100000000000000000000000,1",
     "row 2, column person_id: 100000000000000000000000 is out of range "
     "(-9223372036854775808 to 9223372036854775807)"),
    ("imgs/0001.jpg,-9223372036854775809,1", "row 2, column person_id: -9223372036854775809 is out of range"),
    ("imgs/0001.jpg,1,2147483648", "row 2, column camera_id: 2147483648 is out of range (0 to 2147483647)"),
    ("imgs/0001.jpg,1,1,2147483648", "row 2, column camera_pair: 2147483648 is out of range (0 to 2147483647)"),
])
def test_a_number_beyond_its_column_type_names_row_and_column(tmp_path: Path, row: str, problem: str) -> None:
    # Reproduced: a person_id of 10^23 gave a bare OverflowError from pyarrow, with no row.
    header = "path,person_id,camera_id" + (",camera_pair" if row.count(",") == 3 else "")
    first = "imgs/0000.jpg,1,0" + (",0" if row.count(",") == 3 else "")
    table = _custom_table(tmp_path, [first, row], header)
    message = _custom_error(tmp_path, table)
    assert message.startswith(f"{table}: invalid custom dataset table:") and problem in message, message


def test_the_largest_person_id_fits(tmp_path: Path) -> None:
    big = 2**63 - 1
    rows = [f"imgs/{i:04d}.jpg,{big - i // 4},{i % 2}" for i in range(8)]
    params = make_params(tmp_path, "custom", {"custom": SourceConfig(url=str(_custom_table(tmp_path, rows)))})
    download.run(params, params.raw_dir())
    assert {i.person_id for i in get_adapter("custom").scan(params.raw_dir())} == {big, big - 1}


def test_the_normalised_custom_table_records_each_image_content(tmp_path: Path) -> None:
    import hashlib

    rows = [f"imgs/{i:04d}.jpg,{i // 4},{i % 2}" for i in range(8)]
    table = _custom_table(tmp_path, rows)
    params = make_params(tmp_path, "custom", {"custom": SourceConfig(url=str(table))})
    download.run(params, params.raw_dir())
    stored = pq.read_table(params.raw_dir() / "custom.parquet").to_pylist()
    assert [r["sha256"] for r in stored] == [hashlib.sha256(Path(r["path"]).read_bytes()).hexdigest() for r in stored]
    assert len({r["sha256"] for r in stored}) == 8
