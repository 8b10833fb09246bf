"""QC report: overlay pixels where the labels are (orientation, aspect, colours), command-line
errors, escaping, and the page itself in real headless Chromium (loads cleanly, one entry per
subject, marks, export, reload, a regenerated report keeping the marks and flagging changed ones)."""

import json
import shutil
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from imsct import __version__
from imsct.cli import main as cli
from imsct.io import save_volume
from imsct.labels import COLOURS, LABELS
from imsct.qc import ALPHA, build_report, render_mosaic, subjects_from_lists

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


# ----------------------------------------------------------------------------- synthetic volume

FOV_MM = {"S": 60.0, "A": 40.0, "R": 10.0}  # superior-inferior, anterior-posterior, left-right
VOXEL_MM = {"S": 0.5, "A": 1.0, "R": 2.0}


def synthetic(axcodes: tuple[str, str, str]):
    """Image (a ramp) and label map on a grid with the given axis codes: tumour in the superior
    anterior quarter, edema in the inferior posterior quarter, both in every sagittal slice."""
    letters = {"R": "R", "L": "R", "A": "A", "P": "A", "S": "S", "I": "S"}
    world_axis = {"R": 0, "A": 1, "S": 2}
    affine = np.diag([0.0, 0.0, 0.0, 1.0])
    shape = []
    for i, code in enumerate(axcodes):
        kind = letters[code]
        n = int(round(FOV_MM[kind] / VOXEL_MM[kind]))
        shape.append(n)
        sign = 1.0 if code in "RAS" else -1.0
        affine[world_axis[kind], i] = sign * VOXEL_MM[kind]
        affine[world_axis[kind], 3] = -sign * VOXEL_MM[kind] * (n - 1) / 2  # centred on the origin
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(float)
    xyz = ijk @ affine[:3, :3].T + affine[:3, 3]
    image = (100 + xyz[..., 2] + 0.5 * xyz[..., 1]).astype(np.float32)
    lab = np.zeros(shape, np.uint8)
    lab[(xyz[..., 2] > 8) & (xyz[..., 2] < 22) & (xyz[..., 1] > 4) & (xyz[..., 1] < 14)] = LABELS["tumor"]
    lab[(xyz[..., 2] < -8) & (xyz[..., 2] > -22) & (xyz[..., 1] < -4) & (xyz[..., 1] > -14)] = LABELS["edema"]
    return image, lab, affine


def class_pixels(mosaic, name: str) -> np.ndarray:
    """Pixels of the overlay showing class ``name``: the plain image blended with its colour, or
    the colour itself (outline)."""
    colour = np.asarray(COLOURS[name], float)
    plain = mosaic.plain.astype(float)
    ov = mosaic.overlay.astype(float)
    blend = (1 - ALPHA) * plain + ALPHA * colour
    changed = np.any(ov != plain, axis=2)
    return changed & (np.all(np.abs(ov - blend) <= 1.01, axis=2) | np.all(ov == colour, axis=2))


@pytest.mark.parametrize("axcodes", [("S", "A", "R"), ("L", "P", "I"), ("A", "R", "S")])
def test_overlay_colours_where_the_labels_are(axcodes):
    image, lab, affine = synthetic(axcodes)
    assert tuple(nib.aff2axcodes(affine)) == axcodes
    mosaic = render_mosaic(image, lab, affine)
    n_slices = int(round(FOV_MM["R"] / VOXEL_MM["R"]))
    assert len(mosaic.tiles) == n_slices  # the lesion is in every slice: all are shown
    changed = np.any(mosaic.overlay != mosaic.plain, axis=2)
    tumour, edema = class_pixels(mosaic, "tumor"), class_pixels(mosaic, "edema")
    assert not (changed & ~tumour & ~edema).any(), "overlay pixels in colours other than the labels'"
    for tile in mosaic.tiles:
        x0, w, h = tile["x0"], tile["width"], tile["height"]
        # square millimetres: the tile's height / width is the field's SI / AP ratio
        assert abs(h / w - FOV_MM["S"] / FOV_MM["A"]) < 0.05
        for mask, expect in ((tumour, "upper-left"), (edema, "lower-right")):
            ys, xs = np.nonzero(mask[:, x0 : x0 + w])
            assert ys.size > 0.04 * w * h, f"{expect} lesion missing in tile {tile}"
            # superior up, anterior left: tumour (superior, anterior) upper left; edema lower right
            up, left = ys.mean() < h / 2, xs.mean() < w / 2
            assert (up, left) == ((True, True) if expect == "upper-left" else (False, False)), (axcodes, expect, ys.mean(), xs.mean(), h, w)
            # the lesion's share of the tile matches its share of the field (14 x 10 mm of 60 x 40)
            assert abs(ys.size / (w * h) - (14 * 10) / (60 * 40)) < 0.02
    # outside the labels the overlay is the plain image, and the plain image is grey
    assert np.array_equal(mosaic.overlay[~changed], mosaic.plain[~changed])
    assert (mosaic.plain[..., 0] == mosaic.plain[..., 1]).mean() > 0.97  # grey but for the captions


def test_subject_text_is_escaped(tmp_path):
    image, lab, affine = synthetic(("S", "A", "R"))
    weird = "<img src=x onerror=alert(1)>&\"'"
    t2 = save_volume(image, affine, tmp_path / f"{weird}_T2w.nii.gz", np.float32)
    seg = save_volume(lab, affine, tmp_path / "seg.nii.gz")
    out = tmp_path / "qc"
    build_report(subjects_from_lists([t2], [seg]), out)
    page = (out / "index.html").read_text()
    assert "<img src=x" not in page and "onerror=alert(1)>" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;&amp;&quot;&#x27;" in page
    pngs = sorted(p.name for p in (out / "img").iterdir())
    # sagittal mosaic and axial panels, each with and without labels
    assert len(pngs) == 4 and all(set(n) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-") for n in pngs)


def test_qc_command_bad_input(phantom_dir, tmp_path, capsys):
    segs = tmp_path / "segs"
    segs.mkdir()
    out = tmp_path / "qc"
    assert cli(["qc", "--dataset", str(phantom_dir), "--segs", str(segs), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(segs / "sub-001_T2w_seg-imsct.nii.gz") in err[0] and "not found" in err[0]
    assert not out.exists()  # nothing written
    t2 = phantom_dir / "sub-001" / "anat" / "sub-001_T2w.nii.gz"
    assert cli(["qc", "--t2", str(t2), str(t2), "--seg", str(t2), "-o", str(out)]) == 2
    assert "1 label map(s) for 2 T2w" in capsys.readouterr().err
    # a folder that is not empty and is no QC report is refused, untouched
    foreign = tmp_path / "data"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert cli(["qc", "--t2", str(t2), "--seg", str(t2), "-o", str(foreign)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]


# ----------------------------------------------------------------------------- browser


@pytest.fixture(scope="module")
def report(phantom_dir, tmp_path_factory):
    """The report of the two phantom subjects over their truth labels, built by ``imsct qc``: a
    label map for sub-001, the SCT-named class masks (as sct_deepseg writes them) for sub-002."""
    from imsct.bids import find_cases
    from imsct.evaluation import truth_labelmap
    from imsct.io import load_volume
    from imsct.labels import SEG_SUFFIXES
    from imsct.labels import output_paths

    root = tmp_path_factory.mktemp("qc")
    segs = root / "segs"
    segs.mkdir()
    first, second = find_cases(phantom_dir)
    t2 = load_volume(first.t2)
    save_volume(truth_labelmap(first, t2.shape), t2.affine, output_paths(first.name, segs)["labelmap"])
    for name in LABELS:
        shutil.copyfile(second.labels[SEG_SUFFIXES[name]], segs / f"{second.name}{SEG_SUFFIXES[name]}.nii.gz")
    out = root / "report"
    levels = str(phantom_dir / "derivatives" / "labels" / "{id}" / "anat" / "{id}_phantom.json")
    args = ["qc", "--dataset", str(phantom_dir), "--segs", str(segs), "--levels", levels, "-o", str(out)]
    assert cli(args) == 0
    return {"out": out, "segs": segs, "args": args, "downloads": root / "downloads"}


@pytest.fixture(scope="module")
def browser(report):
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is not installed (Debian package 'chromium'); the browser test needs it")
    assert CHROMEDRIVER.exists(), f"{CHROMEDRIVER} is missing: install the Debian package 'chromium-driver'"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    report["downloads"].mkdir()
    profile = report["downloads"].parent / "profile"
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", f"--user-data-dir={profile}", "--window-size=1400,1000"):
        opts.add_argument(flag)
    opts.add_experimental_option("prefs", {"download.default_directory": str(report["downloads"]),
                                           "download.prompt_for_download": False})
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=opts)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _open(driver, out: Path):
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get((out / "index.html").as_uri())
    WebDriverWait(driver, 30).until(
        lambda d: d.execute_script(
            "return document.readyState === 'complete' && !!window.imsctQC && "
            "Array.from(document.images).every(i => i.complete || i.loading === 'lazy')"
        )
    )


def _severe(driver) -> list:
    return [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]


def _counts(driver) -> dict:
    box = driver.find_element("id", "summary")
    return {k: int(box.get_attribute(f"data-{k}")) for k in ("pass", "fail", "artifact", "unset")}


IN_VIEW_JS = """
const head = document.getElementById('top').getBoundingClientRect().bottom;
const el = arguments[0];
const parts = [el.querySelector('.summary-table'), ...el.querySelectorAll('.qc button')];
return parts.map(p => {
  const r = p.getBoundingClientRect();
  const hit = document.elementFromPoint((r.left + r.right) / 2, (r.top + r.bottom) / 2);
  return {what: p.className || p.tagName, top: r.top, bottom: r.bottom, left: r.left, right: r.right,
          head: head, width: innerWidth, height: innerHeight, on_top: !!hit && p.contains(hit)};
});
"""


def _assert_in_view(driver, entry):
    """The subject's summary table and verdict buttons lie inside the viewport of a 1400 x 1000
    window, below the sticky header, not covered by anything (element bounding boxes)."""
    boxes = driver.execute_script(IN_VIEW_JS, entry)
    assert len(boxes) == 5, boxes  # summary, pass, fail, artifact, unset
    for b in boxes:
        # a 1400 x 1000 window: its viewport is narrower by any scrollbar, lower by the browser's own bars (857 px headless)
        assert 1380 <= b["width"] <= 1400 and 800 <= b["height"] <= 1000, b
        inside = b["top"] >= b["head"] - 0.5 and b["bottom"] <= b["height"] and b["left"] >= 0 and b["right"] <= b["width"]
        assert inside and b["on_top"], b


def _wait_for_file(folder: Path, pattern: str, seconds: float = 20.0) -> Path:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        done = [p for p in folder.glob(pattern) if not p.name.endswith(".crdownload")]
        if done:
            return done[0]
        time.sleep(0.2)
    raise AssertionError(f"no {pattern} appeared in {folder}: {sorted(p.name for p in folder.iterdir())}")


def test_report_in_chromium(report, browser, phantom_dir):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    out, driver = report["out"], browser
    _open(driver, out)
    assert _severe(driver) == []
    images_js = "return Array.from(document.querySelectorAll('img.' + arguments[0])).map(i => [i.getAttribute('src'), i.naturalWidth, i.naturalHeight, i.complete])"
    images = driver.execute_script(images_js, "ov")
    assert len(images) == 2 * 2 * 2  # two subjects x (T2w, T1w) x (sagittal mosaic, axial panels), with overlays
    assert all(w > 0 and h > 0 for _, w, h, _ in images), images
    for src, *_ in images:  # the page shows the PNG files next to it
        assert (out / src.split("?")[0]).is_file()
    # 'o' swaps to the images without overlays (loaded when first shown)
    driver.find_element(By.TAG_NAME, "body").send_keys("o")
    assert "no-overlay" in driver.find_element(By.TAG_NAME, "body").get_attribute("class")
    # lazy: each loads when scrolled near
    WebDriverWait(driver, 30).until(lambda d: all(c for *_, c in d.execute_script(
        "document.querySelectorAll('img.plain').forEach(i => { if (!i.complete) i.scrollIntoView(); });" + images_js, "plain")))
    driver.execute_script("window.scrollTo(0, 0)")
    plain = driver.execute_script(images_js, "plain")
    assert len(plain) == 8 and all(w > 0 and h > 0 for _, w, h, _ in plain), plain
    assert [w for _, w, _, _ in plain] == [w for _, w, _, _ in images]
    driver.find_element(By.TAG_NAME, "body").send_keys("o")
    entries = driver.find_elements(By.CSS_SELECTOR, "section.subject")
    assert [e.get_attribute("data-subject") for e in entries] == ["sub-001", "sub-002"]
    # at 1400 x 1000: the first subject's summary and verdict buttons without scrolling, the images
    # shown at their own size (captions drawn for that size stay legible)
    assert driver.execute_script("return scrollY") == 0
    _assert_in_view(driver, entries[0])
    shown = driver.execute_script("return Array.from(document.querySelectorAll('img.ov')).map(i => [i.clientWidth, i.naturalWidth])")
    assert all(c == n for c, n in shown), shown
    shot = report["downloads"].parent / "qc-1400x1000.png"
    driver.save_screenshot(str(shot))
    print(f"QC page screenshot (1400 x 1000): {shot}")
    # the page says which slices it shows, and the tiles' slice numbers are the manifest's
    manifest = json.loads((out / "report.json").read_text())
    for e, rec in zip(entries, manifest["subjects"]):
        text = e.find_element(By.CSS_SELECTOR, ".shown").text
        assert "Sagittal slices shown: " + ", ".join(map(str, rec["images"]["t2"]["slices"])) in text
        for name, k in rec["most_lesion_slice"].items():
            assert f"most {name} #{k}" in text and k in rec["images"]["t2"]["slices"]
        assert rec["images"]["t2"]["axial"]["slices"]
        # provenance: no sidecar beside these masks, so the page says so; the report's version and command line
        prov = e.find_element(By.CSS_SELECTOR, "details.provenance")
        assert "no sidecar JSON next to the masks" in prov.get_attribute("textContent")
    line = driver.find_element(By.ID, "report-provenance").text
    assert f"imsct {__version__}" in line and "imsct qc --dataset" in line and "generated 20" in line
    # morphometrics table: the tumour row names the levels of the phantom's truth lesions
    for e in entries:
        truth = json.loads((phantom_dir / "derivatives" / "labels" / e.get_attribute("data-subject") / "anat"
                            / f"{e.get_attribute('data-subject')}_phantom.json").read_text())
        row = e.find_element(By.XPATH, ".//table[@class='morpho']/tbody/tr[th[normalize-space(.)='tumor']]")
        shown = row.find_element(By.CSS_SELECTOR, "td.lv").text
        # the lesions inside the T2w's field (a capped phantom field may leave a distant one out)
        img = nib.load(phantom_dir / e.get_attribute("data-subject") / "anat" / f"{e.get_attribute('data-subject')}_T2w.nii.gz")
        corners = np.array([[i, j, k, 1] for i in (0, img.shape[0] - 1) for j in (0, img.shape[1] - 1) for k in (0, img.shape[2] - 1)])
        z = (img.affine @ corners.T)[2]
        inside = [les for les in truth["lesions"] if z.min() <= les["z_mm"] <= z.max()]
        assert inside and all(les["level"] in shown for les in inside), (shown, truth["lesions"])
        assert row.find_elements(By.TAG_NAME, "td")[0].text == str(len(inside))  # one component per lesion
    assert _counts(driver) == {"pass": 0, "fail": 0, "artifact": 0, "unset": 2}

    entries[0].find_element(By.CSS_SELECTOR, "button[data-mark=pass]").click()
    entries[1].find_element(By.CSS_SELECTOR, "button[data-mark=fail]").click()
    entries[1].find_element(By.CSS_SELECTOR, "textarea.comment").send_keys("edema <missed> & cavity")
    assert _counts(driver) == {"pass": 1, "fail": 1, "artifact": 0, "unset": 0}
    assert "1 pass, 1 fail, 0 artifact, 0 unset" in driver.find_element(By.ID, "summary").text
    expected = {"sub-001": {"qc": "pass", "comment": ""}, "sub-002": {"qc": "fail", "comment": "edema <missed> & cavity"}}
    assert driver.execute_script("return window.imsctQC.exportData()") == expected

    # the Export button downloads the same JSON as a file
    driver.find_element(By.ID, "export").click()
    exported = json.loads(_wait_for_file(report["downloads"], "qc-*.json").read_text())
    assert exported == expected

    # marks survive a reload
    driver.refresh()
    _open(driver, out)
    entries = driver.find_elements(By.CSS_SELECTOR, "section.subject")
    assert _counts(driver) == {"pass": 1, "fail": 1, "artifact": 0, "unset": 0}
    assert entries[1].find_element(By.CSS_SELECTOR, "button[data-mark=fail]").get_attribute("aria-pressed") == "true"
    assert entries[1].find_element(By.CSS_SELECTOR, "textarea.comment").get_attribute("value") == "edema <missed> & cavity"

    # keyboard: j goes to the first subject, u unsets it
    body = driver.find_element(By.TAG_NAME, "body")
    body.send_keys("ju")
    assert _counts(driver) == {"pass": 0, "fail": 1, "artifact": 0, "unset": 1}
    # advance is off by default and the page says so: p marks the subject and stays on it
    advance = driver.find_element(By.ID, "advance")
    assert not advance.is_selected()
    assert "stays on the subject (advance is off)" in driver.find_element(By.ID, "advance-state").text
    body.send_keys("p")
    assert driver.execute_script("return window.imsctQC.current()") == "sub-001"
    assert driver.find_element(By.ID, "status").text == "sub-001: pass; staying on it (advance is off)"
    # n turns advance on (the box shows it): a marks artifact and moves to the next subject
    body.send_keys("n")
    assert advance.is_selected() and "moves to the next subject (advance is on)" in driver.find_element(By.ID, "advance-state").text
    body.send_keys("a")
    assert driver.execute_script("return window.imsctQC.current()") == "sub-002"
    assert driver.find_element(By.ID, "status").text == "sub-001: artifact; advanced to sub-002"
    assert _counts(driver) == {"pass": 0, "fail": 1, "artifact": 1, "unset": 0}
    assert driver.execute_script("return window.imsctQC.exportData()")["sub-001"] == {"qc": "artifact", "comment": ""}
    assert "qc-artifact" in entries[0].get_attribute("class") and entries[0].find_element(By.CSS_SELECTOR, ".badge").text == "ARTIFACT"
    # the subject moved to shows its summary and buttons without scrolling further
    _assert_in_view(driver, entries[1])
    # advance on: a verdict on the last subject stays there, and says so
    body.send_keys("f")
    assert driver.find_element(By.ID, "status").text == "sub-002: fail; last subject, staying"
    # the box off again by a click: a click on a button stays too
    advance.click()
    driver.execute_script("arguments[0].scrollIntoView()", entries[0])  # below the sticky header (scroll-margin)
    entries[0].find_element(By.CSS_SELECTOR, "button[data-mark=pass]").click()
    assert driver.execute_script("return window.imsctQC.current()") == "sub-001"
    assert _counts(driver) == {"pass": 1, "fail": 1, "artifact": 0, "unset": 0}
    assert _severe(driver) == []

    # regenerate after sub-002's label map changed: same report id, marks kept, sub-002's flagged stale
    report_id = json.loads((out / "report.json").read_text())["report_id"]
    seg2 = report["segs"] / "sub-002_T2w_seg-tumor.nii.gz"
    img = nib.load(seg2)
    data = np.asarray(img.dataobj).copy()
    data[tuple(np.argwhere(data > 0)[0])] = 0
    save_volume(data, img.affine, seg2)
    assert cli(report["args"]) == 0
    assert json.loads((out / "report.json").read_text())["report_id"] == report_id
    _open(driver, out)
    assert _counts(driver) == {"pass": 1, "fail": 1, "artifact": 0, "unset": 0}
    stale = [e.find_element(By.CSS_SELECTOR, ".stale").is_displayed()
             for e in driver.find_elements(By.CSS_SELECTOR, "section.subject")]
    assert stale == [False, True]
    data = driver.execute_script("return window.imsctQC.exportData()")
    assert data["sub-002"] == {**expected["sub-002"], "stale": True} and data["sub-001"] == expected["sub-001"]
    # importing an export restores marks for the report's subjects and ignores others
    n = driver.execute_script("return window.imsctQC.importData(arguments[0])",
                              {"sub-001": {"qc": "fail", "comment": "re-read"}, "sub-999": {"qc": "pass"}})
    assert n == 1 and _counts(driver) == {"pass": 0, "fail": 2, "artifact": 0, "unset": 0}
    assert driver.execute_script("return window.imsctQC.exportData()")["sub-001"] == {"qc": "fail", "comment": "re-read"}
    assert _severe(driver) == []


def test_failed_subject_listed_empty_label_map_rendered(tmp_path, capsys):
    image, lab, affine = synthetic(("S", "A", "R"))
    ok_t2 = save_volume(image, affine, tmp_path / "sub-a_T2w.nii.gz", np.float32)
    empty = save_volume(np.zeros_like(lab), affine, tmp_path / "sub-a_seg.nii.gz")
    bad_t2 = save_volume(image, affine, tmp_path / "sub-b_T2w.nii.gz", np.float32)
    shifted = affine.copy()
    shifted[:3, 3] += 5.0
    bad_seg = save_volume(lab, shifted, tmp_path / "sub-b_seg.nii.gz")
    out = tmp_path / "qc"
    rc = cli(["qc", "--t2", str(ok_t2), str(bad_t2), "--seg", str(empty), str(bad_seg), "-o", str(out)])
    assert rc == 1
    err = capsys.readouterr().err
    assert f"sub-b: label map {bad_seg}: its grid" in err
    manifest = json.loads((out / "report.json").read_text())
    assert [s["id"] for s in manifest["subjects"]] == ["sub-a", "sub-b"] and list(manifest["errors"]) == ["sub-b"]
    page = (out / "index.html").read_text()
    assert page.count('<section class="subject"') == 2 and "Could not render: label map" in page
    # an empty label map shows central slices without any overlay
    assert sorted(p.name for p in (out / "img").iterdir()) == ["sub-a_t2.png", "sub-a_t2_plain.png"]
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(out / "img" / "sub-a_t2.png")), np.asarray(Image.open(out / "img" / "sub-a_t2_plain.png")))


# ----------------------------------------------------------------------------- slices, axial panels, provenance


def _lesion_between_samples():
    """A label map on an RAS grid (30 sagittal slices of 2 mm) whose lesion spans slices 8-16: the
    old even spread over 7..17 showed 7, 8, 10, 11, 13, 14, 16, 17 and so skipped the slice with most
    tumour (12), most edema (9) and most cavity (15)."""
    shape = (30, 40, 120)  # R, A, S
    affine = np.diag([2.0, 1.0, 0.5, 1.0])
    affine[:3, 3] = -(np.asarray(shape) - 1) / 2 * np.diag(affine)[:3]
    lab = np.zeros(shape, np.uint8)
    lab[8:17, 18:22, 50:60] = LABELS["tumor"]  # a thin tumour through every slice of the lesion
    lab[12, 14:26, 40:80] = LABELS["tumor"]  # most tumour
    lab[9, 14:26, 62:70] = LABELS["edema"]  # the only edema
    lab[15, 14:26, 30:40] = LABELS["cavity"]  # the only cavity
    image = np.random.default_rng(0).normal(100, 10, shape).astype(np.float32)
    return image, lab, affine


def test_mosaic_shows_the_slices_with_most_lesion(tmp_path):
    image, lab, affine = _lesion_between_samples()
    assert tuple(nib.aff2axcodes(affine)) == ("R", "A", "S")
    old = sorted({int(round(v)) for v in np.linspace(7, 17, 8)})
    assert old == [7, 8, 10, 11, 13, 14, 16, 17] and not {9, 12, 15} & set(old)  # what users saw
    mosaic = render_mosaic(image, lab, affine)
    shown = [t["slice"] for t in mosaic.tiles]
    assert len(shown) == 8 and {9, 12, 15} <= set(shown) and shown[0] == 7 and shown[-1] == 17, shown
    assert [t["text"] for t in mosaic.tiles] == [f"#{k}" for k in shown]  # the number drawn on each tile
    # each tile is that slice: its overlay shows the classes of that slice only
    for tile in mosaic.tiles:
        x0, w = tile["x0"], tile["width"]
        sub = type(mosaic)(overlay=mosaic.overlay[:, x0 : x0 + w], plain=mosaic.plain[:, x0 : x0 + w])
        for name in ("edema", "cavity"):
            assert class_pixels(sub, name).any() == (lab[tile["slice"]] == LABELS[name]).any(), (tile, name)
    # the page says which slices it shows and where each class is largest
    t2 = save_volume(image, affine, tmp_path / "sub-x_T2w.nii.gz", np.float32)
    seg = save_volume(lab, affine, tmp_path / "sub-x_seg-imsct.nii.gz")
    manifest = build_report(subjects_from_lists([t2], [seg]), tmp_path / "qc")
    assert manifest["subjects"][0]["images"]["t2"]["slices"] == shown
    assert manifest["subjects"][0]["most_lesion_slice"] == {"tumor": 12, "edema": 9, "cavity": 15}
    page = (tmp_path / "qc" / "index.html").read_text()
    assert shown == [7, 9, 10, 12, 13, 15, 16, 17]  # each must-show slice replaced its nearest evenly spread one
    assert "Sagittal slices shown: 7, 9, 10, 12, 13, 15, 16, 17; most tumor #12, most edema #9, most cavity #15" in page


@pytest.mark.parametrize("axcodes", [("R", "A", "S"), ("L", "P", "I"), ("A", "R", "S")])
def test_axial_panel_through_each_lesion(axcodes):
    from imsct.qc import lesion_centres, render_axial, to_display

    image, _, affine = synthetic(axcodes)
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in image.shape], indexing="ij"), -1).astype(float)
    x, y, z = np.moveaxis(ijk @ affine[:3, :3].T + affine[:3, 3], -1, 0)
    lab = np.zeros(image.shape, np.uint8)
    # two lesions: superior on the patient's right and anterior, inferior on the left and posterior
    lab[(np.abs(z - 15) < 5) & (x > 1) & (x < 5) & (y > 4) & (y < 14)] = LABELS["tumor"]
    lab[(np.abs(z + 15) < 5) & (x < -1) & (x > -5) & (y < -4) & (y > -14)] = LABELS["cavity"]
    dlab, sizes, _ = to_display(lab, affine)
    centres = lesion_centres(dlab, sizes)
    assert len(centres) == 2
    axial = render_axial(image, lab, affine, centres)
    assert [t["text"].split(":")[0] for t in axial.tiles] == ["1", "2"]
    for tile, name, (left, up) in zip(axial.tiles, ("tumor", "cavity"), ((True, True), (False, False))):
        x0, w, h = tile["x0"], tile["width"], tile["height"]
        sub = type(axial)(overlay=axial.overlay[:, x0 : x0 + w], plain=axial.plain[:, x0 : x0 + w])
        ys, xs = np.nonzero(class_pixels(sub, name))
        assert ys.size, (tile, name)
        # radiological: the patient's right on the left, anterior up
        assert (xs.mean() < w / 2, ys.mean() < h / 2) == (left, up), (axcodes, name, xs.mean(), ys.mean(), w, h)
        assert not class_pixels(sub, "cavity" if name == "tumor" else "tumor").any()  # the other lesion is not in this slice
    # the slice number drawn is the index along the file's superior-inferior axis, through the lesion centre
    si_axis = [i for i, c in enumerate(axcodes) if c in "SI"][0]
    for tile, name in zip(axial.tiles, ("tumor", "cavity")):
        idx = np.argwhere(lab == LABELS[name])[:, si_axis]
        assert idx.min() <= tile["slice"] <= idx.max()


def test_scale_bar_and_large_letters():
    from imsct.qc import FONT_PX, scale_bar_mm

    assert scale_bar_mm(0.25, 160) == 10.0 and scale_bar_mm(0.5, 240) == 20.0 and scale_bar_mm(1.0, 20) == 5.0 and scale_bar_mm(1.0, 5) == 5.0
    image, lab, affine = synthetic(("S", "A", "R"))
    mosaic = render_mosaic(image, lab, affine)
    last = mosaic.tiles[-1]
    h, x0, w = last["height"], last["x0"], last["width"]
    # the bar: a run of caption-yellow pixels 10 mm long (at mm_per_pixel) near the bottom of the last tile
    yellow = np.all(mosaic.plain == (255, 255, 0), axis=2)
    runs = [yellow[y, x0 : x0 + w].sum() for y in range(h - 14, h)]
    assert abs(max(runs) - 10.0 / mosaic.mm_per_pixel) <= 2, (runs, mosaic.mm_per_pixel)
    # letters are drawn in a font of FONT_PX pixels: the S on the first tile is 11 px high (8 in the default size-10 font)
    first = mosaic.tiles[0]
    rgb = mosaic.plain[: FONT_PX + 8, first["x0"] : first["x0"] + first["width"]].astype(int)
    ys = np.nonzero((rgb[..., 0] > 180) & (rgb[..., 1] > 180) & (rgb[..., 2] < 90))[0]  # yellow, anti-aliased
    assert ys.size and ys.max() - ys.min() + 1 >= 11, ys


def test_provenance_from_sidecar_or_models_folder(tmp_path, capsys):
    import hashlib

    image, lab, affine = synthetic(("S", "A", "R"))
    t2a = save_volume(image, affine, tmp_path / "sub-a_T2w.nii.gz", np.float32)
    t2b = save_volume(image, affine, tmp_path / "sub-b_T2w.nii.gz", np.float32)
    sega = save_volume(lab, affine, tmp_path / "sub-a_T2w_seg-imsct.nii.gz")
    segb = save_volume(lab, affine, tmp_path / "sub-b_T2w_seg-imsct.nii.gz")
    digest = "ab12" * 16
    (tmp_path / "sub-a_T2w_seg-imsct.json").write_text(json.dumps({
        # the format imsct.inference.provenance writes
        "GeneratedBy": {"Name": "imsct", "Version": "0.0.9"}, "command": "imsct segment --t2 sub-a_T2w.nii.gz -o out", "date": "2026-01-05",
        "models": {"model.pt": {"model": "tumor", "sha256": digest}}}))
    models = tmp_path / "models"
    models.mkdir()
    (models / "model.pt").write_bytes(b"weights of the tumour model")
    out = tmp_path / "qc"
    assert cli(["qc", "--t2", str(t2a), str(t2b), "--seg", str(sega), str(segb), "--models", str(models), "-o", str(out)]) == 0
    capsys.readouterr()
    page = (out / "index.html").read_text()
    manifest = json.loads((out / "report.json").read_text())
    a, b = page.split('data-subject="sub-a"')[1].split('data-subject="sub-b"')
    # sub-a: its sidecar's record
    assert "imsct 0.0.9" in a and "2026-01-05" in a and "imsct segment --t2 sub-a_T2w.nii.gz -o out" in a and f"sha256 {digest}" in a
    assert manifest["subjects"][0]["provenance"]["source"] == str(tmp_path / "sub-a_T2w_seg-imsct.json")
    # sub-b: no sidecar, said so; the models folder given to imsct qc, with the file's SHA-256
    real = hashlib.sha256(b"weights of the tumour model").hexdigest()
    assert "no sidecar JSON next to the masks" in b and str(tmp_path / "sub-b_T2w_seg-imsct.json") in b
    assert f"sha256 {real}" in b and "model.pt" in b
    assert manifest["provenance"]["models"] == {"model.pt": {"model": "tumor", "sha256": real}}
    # the report's own: version, the command line, the date
    cmd = manifest["provenance"]["command"]
    assert cmd.startswith("imsct qc --t2 ") and f"--models {models}" in cmd and cmd in html_unescape(page)
    assert f"Report: imsct {__version__}" in page
    # a models folder without model files is refused, naming it
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli(["qc", "--t2", str(t2a), "--seg", str(sega), "--models", str(empty), "-o", str(tmp_path / "qc2")]) == 2
    assert f"models folder {empty}: none of" in capsys.readouterr().err


def html_unescape(text: str) -> str:
    import html

    return html.unescape(text)


def test_levels_and_damage_ratio_from_the_masks_beside(tmp_path):
    """With the tight cord and the level map that imsct segment writes beside the label map
    (_seg-cord, _seg-levels), the QC morphometrics give each lesion its levels and the maximal
    axial damage ratio, with no levels file; a level map on another grid is ignored, not misread."""
    from imsct.labels import CORD_SUFFIX, LABELMAP_SUFFIX, LEVELS_SUFFIX
    from imsct.levels import level_number

    image, lab, affine = synthetic(("R", "A", "S"))
    xyz = np.stack(np.meshgrid(*[np.arange(n) for n in lab.shape], indexing="ij"), -1) @ affine[:3, :3].T + affine[:3, 3]
    cord = (np.abs(xyz[..., 1]) < 18).astype(np.uint8)  # the cord holds both lesions: the tumour fills 10/36 of its AP width
    levels = np.where(xyz[..., 2] > 15, level_number("C4"), level_number("C5")).astype(np.uint8) * cord
    t2 = save_volume(image, affine, tmp_path / "sub-a_T2w.nii.gz", np.float32)
    seg = save_volume(lab, affine, tmp_path / f"sub-a_T2w{LABELMAP_SUFFIX}.nii.gz")
    save_volume(cord, affine, tmp_path / f"sub-a_T2w{CORD_SUFFIX}.nii.gz")
    save_volume(levels, affine, tmp_path / f"sub-a_T2w{LEVELS_SUFFIX}.nii.gz")
    manifest = build_report(subjects_from_lists([t2], [seg]), tmp_path / "qc")
    comps = manifest["subjects"][0]["morphometrics"]["components"]
    by_class = {c["class"]: c for c in comps}
    assert by_class["tumor"]["levels"] == ["C4", "C5"]  # 8..22 mm across the C4/C5 boundary at 15 mm
    assert by_class["edema"]["levels"] == ["C5"]
    ratio = by_class["tumor"]["max_axial_damage_ratio"]
    assert ratio is not None and 0.15 < ratio < 0.6, ratio
    assert "max. axial damage ratio" in (tmp_path / "qc" / "index.html").read_text()
    # the same level map on a shifted grid is not used (no levels rather than wrong ones)
    shifted = affine.copy()
    shifted[:3, 3] += 5.0
    save_volume(levels, shifted, tmp_path / f"sub-a_T2w{LEVELS_SUFFIX}.nii.gz")
    manifest = build_report(subjects_from_lists([t2], [seg]), tmp_path / "qc2")
    assert all(not c["levels"] for c in manifest["subjects"][0]["morphometrics"]["components"])
