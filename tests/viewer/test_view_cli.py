"""``unireg register --report html`` and ``unireg view``: the page joins the output folder's
transaction and manifest; bad folders and inputs are named before any work."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import oblique_pair, write_nifti  # noqa: E402

from unireg.cli import main  # noqa: E402
from unireg.io.outputs import manifest_problems  # noqa: E402


@pytest.fixture
def pair(tmp_path):
    return oblique_pair(tmp_path, (24, 26, 22), 3, (-24, -26, -24), (5, -3, 4), (-22, -27, -23))


def _data(page: str) -> dict:
    m = re.search(r'<script type="application/json" id="unireg-data">(.*?)</script>', page, re.S)
    assert m is not None
    return json.loads(m.group(1))


def test_register_report_html_and_view_make_the_same_page(pair, tmp_path):
    f, m, fl, ml = pair
    out = tmp_path / "out"
    assert main(["register", str(f), str(m), "-o", str(out), "--method", "affine",
                 "--fixed-labels", str(fl), "--moving-labels", str(ml), "--report", "html",
                 "--quiet"]) == 0  # fmt: skip
    assert (out / "report.html").is_file() and not (out / "report.png").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert "report.html" in manifest["files"] and manifest_problems(out) == []
    from_register = _data((out / "report.html").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert from_register["metrics"]["dice_mean"] == pytest.approx(metrics["dice_mean"])
    assert {r["label"] for r in from_register["labels"]} == {1, 2}

    (out / "report.html").unlink()  # as if the page had never been written
    assert main(["view", str(out), "--quiet"]) == 0
    assert manifest_problems(out) == []
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["report"]["command"][:2] == ["unireg", "view"]
    assert manifest["spec"] == "affine"  # the registration's provenance is kept
    from_view = _data((out / "report.html").read_text())
    # both read the same map: the register one from memory, view from transform.nii.gz
    assert from_view["volumes"]["fixed"] == from_register["volumes"]["fixed"]
    assert from_view["labels"] == from_register["labels"]
    assert from_view["folded_voxels"] == from_register["folded_voxels"]


def test_view_resolution_and_output_path(pair, tmp_path):
    f, m, _, _ = pair
    out = tmp_path / "out"
    assert main(["register", str(f), str(m), "-o", str(out), "--method", "affine", "-q"]) == 0
    page = tmp_path / "elsewhere" / "page.html"
    page.parent.mkdir()
    assert main(["view", str(out), "-o", str(page), "--report-resolution", "4", "-q"]) == 0
    data = _data(page.read_text())
    assert data["report_grid"]["fixed"]["spacing"] == pytest.approx([4.0, 4.0, 4.0])
    assert data["report_grid"]["fixed"]["shape"] == [12, 13, 12]  # 24x26x22 at 2, 2, 2.2 mm
    assert "report.html" not in json.loads((out / "manifest.json").read_text())["files"]


def test_view_refuses_bad_folders_and_names_the_file(pair, tmp_path, capsys):
    f, m, _, _ = pair
    assert main(["view", str(tmp_path / "missing")]) == 1
    assert "missing" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["view", str(empty)]) == 1
    assert "metrics.json" in capsys.readouterr().err
    out = tmp_path / "out"
    assert main(["register", str(f), str(m), "-o", str(out), "--method", "affine", "-q"]) == 0
    # the fixed image given is not the grid the transform is on
    other = write_nifti(tmp_path / "other.nii.gz", np.zeros((5, 5, 5), np.float32) + 1, np.eye(4))
    assert main(["view", str(out), "--fixed", str(other)]) == 1
    err = capsys.readouterr().err
    assert "transform.nii.gz" in err and "grid" in err
    assert not (out / "report.html").exists() and manifest_problems(out) == []
    # an input changed since the registration: a warning, the page is still written
    data = nib.load(str(m))
    nib.save(nib.Nifti1Image(np.asarray(data.dataobj) * 2, data.affine), str(m))
    assert main(["view", str(out), "-q"]) == 0
    assert "changed since the registration" in capsys.readouterr().err
    assert main(["register", str(f), str(m), "-o", str(tmp_path / "o2"), "--method", "affine",
                 "--report", "html", "--report-resolution", "0"]) == 1  # fmt: skip
    assert "--report-resolution" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()


def test_report_flag_keeps_png_as_its_default(pair, tmp_path):
    f, m, _, _ = pair
    out = tmp_path / "out"
    assert main(["register", str(f), str(m), "-o", str(out), "--method", "affine", "-q",
                 "--report"]) == 0  # fmt: skip
    assert (out / "report.png").is_file() and not (out / "report.html").exists()


def test_evaluate_report_links_a_page_per_registration(pair, tmp_path):
    f, m, fl, ml = pair
    csv = tmp_path / "pairs.csv"
    csv.write_text(f"fixed,moving,fixed_labels,moving_labels\n{f},{m},{fl},{ml}\n")
    out = tmp_path / "eval"
    assert main(["evaluate", "--pairs", str(csv), "--methods", "none", "unireg:affine",
                 "--angles", "0", "20", "--no-hd95", "--report", "html", "-o", str(out),
                 "-q"]) == 0  # fmt: skip
    pages = sorted(p.name for p in out.glob("case-*.html"))
    assert pages == [f"case-{i:04d}.html" for i in range(1, 5)]
    index = (out / "report.html").read_text()
    data = _data(index)
    assert data["links"] == pages and len(data["rows"]) == 4
    assert [r["method"] for r in data["rows"]] == ["none", "unireg:affine"] * 2
    assert set(data["plots"]) == {"dice_vs_angle.png", "dice_boxplot.png"}
    assert "NVImage" not in index and len(index) < 500_000  # the index needs no viewer
    # each case page shows its own registration: its Dice is its row's
    case = _data((out / pages[3]).read_text())
    assert case["metrics"]["dice_mean"] == pytest.approx(data["rows"][3]["dice_mean"])
    assert case["settings"]["method"] == "unireg:affine"
    assert manifest_problems(out) == []
    assert set(json.loads((out / "manifest.json").read_text())["files"]) >= {*pages, "report.html"}
