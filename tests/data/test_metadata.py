import shutil

import pandas as pd
import pytest

from helpers import write_image
from lesionkit import LesionkitError
from lesionkit.data.metadata import index_images, limit_per_class, load_dataset, read_metadata, summary
from lesionkit.data.images import load_image


def test_reads_official_layout(ham_folder):
    dataset = load_dataset(ham_folder)
    assert not dataset.problems
    assert len(dataset.frame) == 70 and dataset.frame["path"].notna().all()
    assert summary(dataset.frame).loc["mel"].tolist() == [10, 5]


def test_kaggle_duplicated_folders_count_once(ham_folder):
    # Kaggle's copy adds lower-case duplicates of both image folders and hmnist CSVs.
    shutil.copytree(ham_folder / "HAM10000_images_part_1", ham_folder / "ham10000_images_part_1")
    (ham_folder / "hmnist_28_28_RGB.csv").write_text("pixel0000,label\n1,2\n")
    dataset = load_dataset(ham_folder)
    assert not dataset.problems and len(dataset.frame) == 70
    assert len(index_images(ham_folder)) == 70


def test_missing_and_corrupt_images_are_named(ham_folder):
    (ham_folder / "HAM10000_images_part_2" / "ISIC_0000000.jpg").unlink()
    broken = ham_folder / "HAM10000_images_part_1" / "ISIC_0000001.jpg"
    broken.write_bytes(broken.read_bytes()[:200])  # truncated JPEG
    (ham_folder / "HAM10000_images_part_1" / "ISIC_0000003.jpg").write_text("not an image")
    problems = load_dataset(ham_folder).problems
    assert set(problems) == {"ISIC_0000000", "ISIC_0000001", "ISIC_0000003"}
    assert problems["ISIC_0000000"].startswith("missing")
    assert problems["ISIC_0000001"].startswith("unreadable")


@pytest.mark.parametrize("edit, message", [
    (lambda f: f.drop(columns="lesion_id"), "lacks column.* lesion_id"),
    (lambda f: f.assign(dx=["melanoma"] + list(f["dx"][1:])), "unknown label.* melanoma on row.* 2"),
    (lambda f: pd.concat([f, f.head(1)]), "image_id listed more than once: ISIC_0000000"),
    (lambda f: f.assign(lesion_id=[None] + list(f["lesion_id"][1:])), "column lesion_id is blank on row"),
])
def test_metadata_problems_are_refused(ham_folder, edit, message):
    path = ham_folder / "HAM10000_metadata.csv"
    edit(pd.read_csv(path)).to_csv(path, index=False)
    with pytest.raises(LesionkitError, match=message):
        load_dataset(ham_folder)


def test_metadata_oddities_that_are_fine(tmp_path, ham_folder):
    frame = pd.read_csv(ham_folder / "HAM10000_metadata.csv")
    frame.loc[0, "age"] = None
    frame["extra"] = 1
    path = tmp_path / "bom.csv"
    path.write_text(frame.to_csv(index=False), encoding="utf-8-sig")  # Excel's byte-order mark
    assert len(read_metadata(path)) == 70


def test_empty_or_semicolon_metadata(tmp_path, ham_folder):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(LesionkitError, match="is empty"):
        read_metadata(empty)
    semi = tmp_path / "semi.csv"
    pd.read_csv(ham_folder / "HAM10000_metadata.csv").to_csv(semi, sep=";", index=False)
    with pytest.raises(LesionkitError, match="lacks column"):
        read_metadata(semi)


def test_absent_folder_and_metadata(tmp_path):
    with pytest.raises(LesionkitError, match="does not exist"):
        load_dataset(tmp_path / "nowhere")
    with pytest.raises(LesionkitError, match="no HAM10000_metadata.csv"):
        load_dataset(tmp_path)


@pytest.mark.parametrize("mode", ["RGBA", "L", "CMYK", "I;16", "P"])
def test_load_image_gives_rgb_for_any_mode(tmp_path, mode):
    suffix = ".jpg" if mode in ("L", "CMYK") else ".png"
    path = write_image(tmp_path / f"x{suffix}", seed=1, size=(60, 40), mode=mode)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (60, 40)


def test_limit_per_class_keeps_whole_lesions(ham_folder):
    frame = load_dataset(ham_folder, decode=False).frame
    small = limit_per_class(frame, 2, seed=0)
    assert (small.groupby("dx")["lesion_id"].nunique() == 2).all()
    assert (small.groupby("lesion_id").size() == 2).all()
    assert small.equals(limit_per_class(frame, 2, seed=0))


def test_real_copy_reports_its_two_absent_images(real_data):
    dataset = load_dataset(real_data)
    assert sorted(dataset.problems) == ["ISIC_0029861", "ISIC_0029938"]
    assert len(dataset.frame) == 10015 and dataset.frame["lesion_id"].nunique() == 7470
