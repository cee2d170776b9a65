"""Label-name tables (unireg.io.label_names): the three formats and named errors."""

from __future__ import annotations

from importlib import resources

import pytest

from unireg.errors import UnreadableFileError
from unireg.io.label_names import read_label_names


def test_dlmuse_csv_shipped_with_the_demo():
    names = read_label_names(str(resources.files("unireg.demo_data") / "MUSE_listROIs.csv"))
    assert names[702] == "ICV" and names[4] == "3rdVentricle" and len(names) > 140


def test_csv_freesurfer_lut_and_json(tmp_path):
    csv = tmp_path / "t.csv"
    csv.write_text("name,value,volume\nLeft-Hippocampus,17,4.5\nRight-Hippocampus,53,4.4\n")
    assert read_label_names(csv) == {17: "Left-Hippocampus", 53: "Right-Hippocampus"}
    lut = tmp_path / "FreeSurferColorLUT.txt"
    lut.write_text("#$Id$\n# No. Label Name: R G B A\n\n0  Unknown 0 0 0 0\n"
                   "17 Left-Hippocampus 220 216 20 0  # comment\n")  # fmt: skip
    assert read_label_names(lut) == {0: "Unknown", 17: "Left-Hippocampus"}
    js = tmp_path / "names.json"
    js.write_text('{"2": "white matter", "3": "cortex"}')
    assert read_label_names(js) == {2: "white matter", 3: "cortex"}


@pytest.mark.parametrize(
    ("name", "text", "problem"),
    [
        ("a.csv", "x,y\nfoo,bar\n", "no column of integer label values"),
        ("a.csv", "only a header\n", "needs a header and rows"),
        ("a.txt", "17 Left 1 2 3 0\nnot a line\n", "line 2"),
        ("a.txt", "# nothing\n", "empty"),
        ("a.json", "[1, 2]", "JSON object"),
    ],
)
def test_bad_tables_are_refused_naming_the_file(tmp_path, name, text, problem):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(UnreadableFileError, match=problem) as err:
        read_label_names(path)
    assert str(path) in str(err.value)
