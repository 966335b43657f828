import pandas as pd
import pytest

from helpers import assert_no_lesion_leak
from lesionkit import LesionkitError
from lesionkit.data.metadata import load_dataset, read_metadata
from lesionkit.data.split import check_folds, make_folds, make_split, read_split, save_split


def test_split_keeps_lesions_whole_and_is_seeded(ham_folder):
    frame = load_dataset(ham_folder, decode=False).frame
    split = make_split(frame, 0.2, 0.2, seed=3)
    assert_no_lesion_leak(split, ham_folder / "HAM10000_metadata.csv")
    assert set(split["split"]) == {"train", "val", "test"}
    assert split.equals(make_split(frame, 0.2, 0.2, seed=3))
    assert not split.equals(make_split(frame, 0.2, 0.2, seed=4))


def test_folds_validate_every_non_test_lesion_once_and_share_the_single_runs_test_part(ham_folder):
    frame = load_dataset(ham_folder, decode=False).frame
    splits = make_folds(frame, 3, 0.25, seed=7)
    single = make_split(frame, 0.2, 0.25, seed=7)
    test = set(single.loc[single["split"] == "test", "image_id"])
    assert test, "no test part: the test proves nothing"
    validated = []
    for split in splits:
        assert_no_lesion_leak(split, ham_folder / "HAM10000_metadata.csv")
        assert list(split["image_id"]) == list(frame["image_id"])  # one row order: one image cache
        assert set(split.loc[split["split"] == "test", "image_id"]) == test
        validated += list(split.loc[split["split"] == "val", "lesion_id"].unique())
    rest = set(frame.loc[~frame["image_id"].isin(test), "lesion_id"])
    assert sorted(validated) == sorted(rest), "every non-test lesion in exactly one fold's validation part"
    assert not rest & set(frame.loc[frame["image_id"].isin(test), "lesion_id"])

    doctored = [split.copy() for split in splits]
    lesion = doctored[0].loc[doctored[0]["split"] == "val", "lesion_id"].iloc[0]
    doctored[1].loc[doctored[1]["lesion_id"] == lesion, "split"] = "val"
    with pytest.raises(LesionkitError, match=f"{lesion} lie in more than one fold's validation part"):
        check_folds(doctored)
    with pytest.raises(LesionkitError, match="at least 2 folds"):
        make_folds(frame, 1, 0.25, seed=7)


def test_real_split_is_grouped_and_stratified(real_data):
    frame = read_metadata(real_data / "HAM10000_metadata.csv")
    split = make_split(frame, 0.2, 0.0, seed=42)
    assert_no_lesion_leak(split, real_data / "HAM10000_metadata.csv")
    share = (split["split"] == "val").mean()
    assert 0.18 < share < 0.22
    # Each class keeps close to the whole set's share in validation.
    whole = frame["dx"].value_counts(normalize=True)
    val = split.loc[split["split"] == "val", "dx"].value_counts(normalize=True)
    assert (abs(whole - val) < 0.02).all()


def test_saved_split_round_trips_and_is_checked(tmp_path, ham_folder):
    frame = load_dataset(ham_folder, decode=False).frame
    split = make_split(frame, 0.25, 0.0, seed=1)
    path = tmp_path / "split.csv"
    save_split(split, path)
    assert read_split(path, frame)["split"].tolist() == split["split"].tolist()

    leaking = split.copy()
    lesion = leaking["lesion_id"].iloc[0]
    leaking.loc[leaking["lesion_id"] == lesion, "split"] = ["train", "val"]
    leaking.to_csv(path, index=False)
    with pytest.raises(LesionkitError, match=f"puts lesion.*{lesion}.*more than one part"):
        read_split(path, frame)

    foreign = pd.concat([split, pd.DataFrame([{"image_id": "ISIC_9", "lesion_id": "X", "dx": "nv", "split": "val"}])])
    foreign.to_csv(path, index=False)
    with pytest.raises(LesionkitError, match="lists 1 image.*ISIC_9"):
        read_split(path, frame)

    relabelled = split.assign(dx="nv")
    relabelled.to_csv(path, index=False)
    with pytest.raises(LesionkitError, match="disagrees with the metadata"):
        read_split(path, frame)


def test_the_leak_check_reads_the_lesions_of_the_metadata(ham_folder):
    """A split.csv that gave a lesion's two images two made-up lesion ids, one per part, looks whole grouped by
    its own column: assert_no_lesion_leak joins the metadata and sees the leak."""
    metadata = ham_folder / "HAM10000_metadata.csv"
    split = make_split(load_dataset(ham_folder, decode=False).frame, 0.25, 0.0, seed=1)
    lesion = split["lesion_id"].iloc[0]
    rows = split["lesion_id"] == lesion
    disguised = split.copy()
    disguised.loc[rows, "split"] = ["train", "val"]
    disguised.loc[rows, "lesion_id"] = ["FAKE_1", "FAKE_2"]
    assert (disguised.groupby("lesion_id")["split"].nunique() == 1).all()  # what the old check saw
    with pytest.raises(AssertionError, match=f"more than one part: \\['{lesion}'\\]"):
        assert_no_lesion_leak(disguised, metadata)
    with pytest.raises(AssertionError, match="the metadata does not: \\['ISIC_9'\\]"):
        assert_no_lesion_leak(pd.concat([split, pd.DataFrame([{"image_id": "ISIC_9", "lesion_id": "X", "dx": "nv",
                                                                "split": "val"}])]), metadata)
