import json

import pytest

from vitdeit.classes import ClassMap, load_labels
from vitdeit.errors import DataError


def write(tmp_path, text):
    p = tmp_path / "Labels.json"
    p.write_text(text)
    return p


def test_class_index_is_position_in_sorted_wnids(tmp_path):
    p = write(tmp_path, json.dumps({"n02000000": "b", "n01000000": "a", "n03000000": "c"}))
    cm = ClassMap.from_file(p)
    assert cm.wnids == ("n01000000", "n02000000", "n03000000")
    assert [cm.index[w] for w in ("n03000000", "n01000000")] == [2, 0]
    assert cm.names == ("a", "b", "c") and len(cm) == 3


def test_shipped_labels_json_has_100_classes():
    from conftest import LABELS

    assert len(load_labels(LABELS)) == 100


@pytest.mark.parametrize("text,fragment", [
    ('{"n01000000": "a", "n01000000": "b"}', "duplicate key 'n01000000'"),
    ("[1, 2]", "non-empty JSON object"),
    ("{}", "non-empty JSON object"),
    ('{"dog": "a"}', "not a WNID (expected 'n' + 8 digits, e.g. 'n01440764'); for classes of your own, name each "
                     "class folder and its Labels.json key by a WNID of your own making (n00000001, n00000002"),
    ('{"n01000000": ""}', "non-empty string"),
    ('{"n01000000": "  "}', "non-empty string"),
    ('{"n01000000": 5}', "non-empty string"),  # a number, not a name
    ('{"n012345678": "a"}', "not a WNID"),  # 9 digits: a typo, not 'n' + 8 digits
    ("{not json", "not valid JSON"),
])
def test_bad_labels_json_is_a_clear_error_naming_the_file(tmp_path, text, fragment):
    p = write(tmp_path, text)
    with pytest.raises(DataError) as e:
        load_labels(p)
    assert fragment in str(e.value) and str(p) in str(e.value)


def test_missing_labels_file_names_the_flag(tmp_path):
    with pytest.raises(DataError, match="--labels"):
        load_labels(tmp_path / "nope.json")
    with pytest.raises(DataError) as e:  # the dataset folder, not its Labels.json
        load_labels(tmp_path)
    assert str(e.value) == (f"{tmp_path}: a folder; pass --labels the JSON file itself (WNID -> name), e.g. --labels "
                            f"{tmp_path / 'Labels.json'}")


def test_short_name_takes_the_first_synonym():
    cm = ClassMap(("n01440764",), ("tench, Tinca tinca",))
    assert cm.short_name(0) == "tench"
    assert ClassMap(("n0",), ("a" * 40,)).short_name(0, 10) == "a" * 9 + "…"
    assert ClassMap(("n0",), ("a" * 10,)).short_name(0, 10) == "a" * 10  # exactly max_len: kept whole


def test_a_missing_labels_file_points_at_the_one_the_repository_ships(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path / 'Labels.json'}: Labels.json not found; pass --labels PATH .*"
                                        "the Labels.json at the top of the vitdeit repository"):
        load_labels(tmp_path / "Labels.json")


def test_class_difference_names_a_few_wnids_of_each_side_and_counts_the_rest():
    from vitdeit.classes import class_difference

    ours = [f"n{i:08d}" for i in range(10)]
    theirs = ours[:4] + [f"n{i:08d}" for i in range(50, 52)]  # 6 of ours missing, 2 extra
    assert class_difference(theirs, ours, "only theirs", "only ours") == (
        "2 only theirs (n00000050, n00000051), 6 only ours (n00000004, n00000005, n00000006 and 3 more)")
    assert class_difference(ours[:3], ours, "x", "y") == "7 y (n00000003, n00000004, n00000005 and 4 more)"
    assert class_difference(ours, list(reversed(ours)), "x", "y") == ""  # same set: nothing to name


def test_some_names_up_to_its_limit_whole_and_counts_the_rest():
    from vitdeit.classes import some

    assert some(["a", "b", "c"]) == "a, b, c" and some(list("abcd")) == "a, b, c and 1 more"
    assert some(list("abcde"), at_most=5) == "a, b, c, d, e" and some([]) == ""


def test_classes_without_images_are_those_counted_zero_only():
    from vitdeit.classes import classes_without_images

    m = {"splits": {"val": {"class_counts": {"n0": 0, "n1": 1, "n2": 5, "n3": 0}}}}
    assert classes_without_images(m, "val") == ["n0", "n3"]


def test_the_pack_fingerprint_changes_with_any_shard_and_with_the_packing_options():
    import copy

    from vitdeit.classes import pack_fingerprint

    shard = lambda i, n: {"file": f"train-{i:06d}.tar", "num_samples": n, "bytes": 10240 * n}  # noqa: E731
    m = {"options": {"seed": 0, "shard_size": 2}, "source": {"data_path": "/d"},
         "splits": {"train": {"shards": [shard(0, 2), shard(1, 1)]}, "val": {"shards": [shard(0, 1)]}}}
    first = pack_fingerprint(m)
    for edit in (lambda c: c["splits"]["train"]["shards"][0].update(bytes=1),  # the first shard too
                 lambda c: c["splits"]["val"]["shards"][0].update(num_samples=2),  # a one-shard split
                 lambda c: c["options"].update(seed=1),  # another global shuffle: same names, counts, sizes
                 lambda c: c["source"].update(data_path="/e")):
        changed = copy.deepcopy(m)
        edit(changed)
        assert pack_fingerprint(changed) != first
    assert pack_fingerprint(copy.deepcopy(m)) == first


def test_the_pack_identity_nodes_compare_follows_the_samples_not_the_folder_or_the_options_that_keep_them():
    import copy

    from vitdeit.classes import pack_fingerprint, pack_identity

    shard = lambda i, n: {"file": f"train-{i:06d}.tar", "num_samples": n, "bytes": 10240 * n}  # noqa: E731
    m = {"options": {"seed": 0, "shard_size": 2, "skip_bad": False}, "source": {"data_path": "/d"},
         "classes": ["n0", "n1"],
         "splits": {"train": {"shards": [shard(0, 2), shard(1, 1)]}, "val": {"shards": [shard(0, 1)]}}}
    first = pack_identity(m)
    for edit, same in ((lambda c: c["source"].update(data_path="/e"), True),  # another node's copy of the images
                       (lambda c: c["options"].update(skip_bad=True), True),  # (no bad file: the same shards)
                       (lambda c: c["options"].update(seed=1), False),  # another shuffle: same names, counts, sizes
                       (lambda c: c["classes"].reverse(), False),  # the labels mean other classes
                       (lambda c: c["splits"]["val"]["shards"][0].update(bytes=1), False)):
        changed = copy.deepcopy(m)
        edit(changed)
        assert (pack_identity(changed) == first) == same
    assert pack_fingerprint({**m, "source": {"data_path": "/e"}}) != pack_fingerprint(m)  # (a checkpoint notes it)


def test_shards_an_earlier_packer_described_without_a_later_option_are_the_same_pack_packed_again_now():
    from vitdeit.classes import LATER_OPTIONS, pack_fingerprint, same_pack

    shards = {"train": {"shards": [{"file": "train-000000.tar", "num_samples": 2, "bytes": 20480}]}}
    earlier = {"options": {"seed": 0, "shard_size": 2}, "source": {"data_path": "/d"}, "splits": shards}
    saved = pack_fingerprint(earlier)  # what a checkpoint trained on the earlier packer's manifest holds
    now = {**earlier, "options": {**earlier["options"], **LATER_OPTIONS}}  # the same shards, packed again now
    assert pack_fingerprint(now) != saved and same_pack(saved, now) and same_pack(pack_fingerprint(now), now)
    assert same_pack(pack_fingerprint(now), earlier)  # saved on the shards packed again, read on an older copy
    for options in ({"allow_missing_classes": True}, {"seed": 1}):  # a later option at another value; another seed
        assert not same_pack(saved, {**now, "options": {**now["options"], **options}})
    for subset in (False, True):  # --subset reads other class folders, and writes the same shards: the same pack
        assert pack_fingerprint({**now, "options": {**now["options"], "subset": subset}}) == pack_fingerprint(now)


def test_the_val_top1_left_by_classes_without_train_images_is_a_bound_rounded_up():
    from vitdeit.classes import without_images_text

    def manifest(train, val):  # class counts per split
        return {"classes": sorted(val), "splits": {"train": {"class_counts": train}, "val": {"class_counts": val}}}

    text = without_images_text(manifest({"n1": 0, "n2": 9}, {"n1": 1, "n2": 5}), "train", "/s")
    assert text == ("1 of the 2 classes has no train images in /s (n1): the model has outputs for them that it never "
                    "learns; 1 of the 6 val images is of those classes, which it gets right only by chance: val top-1 "
                    "tops out near 83.4 %")  # 5/6: 83.33, rounded up
    assert without_images_text(manifest({"n1": 0, "n2": 9}, {"n1": 0, "n2": 5}), "train", "/s").endswith("never learns")
    assert without_images_text(manifest({"n1": 3, "n2": 9}, {"n1": 0, "n2": 5}), "val", "/s") == (
        "1 of the 2 classes has no val images in /s (n1): the model has outputs for them that it is never scored on")
    assert without_images_text(manifest({"n1": 3, "n2": 9}, {"n1": 0, "n2": 5}), "train", "/s") is None


def test_a_file_named_by_a_wnid_is_no_class_folder(tmp_path):
    from vitdeit.classes import holds_class_folders

    (tmp_path / "n01440764").write_bytes(b"")  # e.g. an image saved without its extension
    (tmp_path / "train.X1").mkdir()
    assert not holds_class_folders(tmp_path)
    (tmp_path / "n01443537").mkdir()
    assert holds_class_folders(tmp_path)
