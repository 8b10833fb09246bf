"""The OHIF viewer served by the IMSCT MONAI Label app (``/ohif/``), reading Orthanc through the app's
DICOMweb proxy, opened in headless Chromium, on the stack ``make serve`` starts (serve.py --orthanc:
a local Orthanc holding a phantom study, the app on a free port, never 8000):

* the MONAI Label mode (``/ohif/monai-label``) opens the study with the T2w in its acquisition plane
  (the sagittal viewport shows the series' own slices), and its MONAI Label panel is set to this
  server's own address and, once connected, lists the models ``cascade``, ``localiser``, ``tumor``;
* the basic viewer shows the sagittal T2w, and after a final label is saved (DICOM SEG in Orthanc)
  the segmentation overlay in the IMSCT colours.

One browser for the module. Screenshots are kept as test artifacts in ``$IMSCT_ARTIFACTS`` (default
``<repo>/work/artifacts``): ``ohif_monailabel.png``, ``ohif_study.png`` and ``ohif_segmentation.png``.
"""

import io
import os
import time
from pathlib import Path

import numpy as np
import pytest
from dicomweb_client import DICOMwebClient

from imsct.io import load_volume, save_volume

from support.cases import labelmap_on_image_grid, phantom_labelmap

from support.paths import ROOT  # noqa: E402
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
ARTIFACTS = Path(os.environ.get("IMSCT_ARTIFACTS", ROOT / "work" / "artifacts"))
WINDOW = (1400, 900)

pytestmark = pytest.mark.skipif(not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)),
                                reason="chromium / chromedriver not installed (Debian packages chromium, chromium-driver; .ci/run installs them)")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--force-device-scale-factor=1",
                 f"--window-size={WINDOW[0]},{WINDOW[1]}",
                 # OHIF 3 draws with WebGL: software WebGL (SwiftShader) instead of a GPU
                 "--use-angle=swiftshader", "--enable-unsafe-swiftshader"):
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(120)
    try:
        yield driver
    finally:
        driver.quit()


def screenshot(driver) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")).astype(np.int16)


def click_button(driver, text: str) -> bool:
    """Click the first button labelled ``text``; False when there is none (the page re-renders often)."""
    from selenium.common.exceptions import StaleElementReferenceException, WebDriverException

    for b in driver.find_elements("css selector", "button"):
        try:
            if b.text.strip() == text:
                b.click()
                return True
        except (StaleElementReferenceException, WebDriverException):
            continue
    return False


def thumbnail_texts(driver) -> list[str]:
    from selenium.common.exceptions import StaleElementReferenceException

    out = []
    for t in driver.find_elements("css selector", "[data-cy^=study-browser-thumbnail]"):
        try:
            out.append(t.text)
        except StaleElementReferenceException:
            continue
    return out


def viewport_box(driver):
    """Screen box (x0, y0, x1, y1) of the largest canvas on the page (the image viewport), or None."""
    from selenium.common.exceptions import StaleElementReferenceException

    best = None
    for c in driver.find_elements("css selector", "canvas"):
        try:
            r = c.rect
        except StaleElementReferenceException:
            continue
        if r["width"] * r["height"] > (0 if best is None else (best[2] - best[0]) * (best[3] - best[1])):
            best = (int(r["x"]), int(r["y"]), int(r["x"] + r["width"]), int(r["y"] + r["height"]))
    return best if best and (best[2] - best[0]) > 100 and (best[3] - best[1]) > 100 else None


def focus_viewport(driver, box) -> None:
    """Click the middle of the viewport so that OHIF's keyboard shortcuts act on it."""
    from selenium.webdriver.common.actions.action_builder import ActionBuilder

    actions = ActionBuilder(driver)
    actions.pointer_action.move_to_location((box[0] + box[2]) // 2, (box[1] + box[3]) // 2).click()
    actions.perform()


SAGITTAL_LETTERS, AXIS_FAMILIES = set("APHF"), ("RL", "AP", "HF")  # OHIF's markers: Right/Left, Anterior/Posterior, Head/Feet


def viewports(driver) -> dict:
    """Per OHIF viewport (``data-viewport-uid``): its orientation markers, series description, bottom-right
    overlay (``I: k (k/N)`` on the series' own slices) and screen box."""
    return driver.execute_script("""
        const out = {};
        for (const pane of document.querySelectorAll('[data-cy=viewport-pane]')) {
          const v = pane.querySelector('[data-viewport-uid]');  // the canvas' element; overlays are its siblings
          if (!v) continue;
          const r = v.getBoundingClientRect();
          const text = sel => Array.from(pane.querySelectorAll(sel)).map(e => e.textContent.trim());
          out[v.getAttribute('data-viewport-uid')] = {
            markers: text('.orientation-marker-value'), series: text('[title="Series description"]'),
            position: text('[data-cy=viewport-overlay-bottom-right]').join(' '),
            box: [Math.round(r.left), Math.round(r.top), Math.round(r.right), Math.round(r.bottom)]};
        }
        return out;""")


def is_sagittal(markers) -> bool:
    """Markers of a sagittal view: anterior/posterior and head/feet, no right/left."""
    letters = set("".join(markers))
    return bool(letters) and letters <= SAGITTAL_LETTERS and bool(letters & set("AP")) and bool(letters & set("HF"))


def panel_text(driver) -> tuple[str, list[str]]:
    """The MONAI Label panel's text and the texts of its drop-down options ('' when it is not there)."""
    from selenium.common.exceptions import StaleElementReferenceException, WebDriverException

    try:
        panel = driver.find_elements("css selector", ".monaiLabelPanel")
        if not panel:
            return "", []
        return panel[0].text, [o.get_attribute("textContent").strip() for o in panel[0].find_elements("css selector", "option")]
    except (StaleElementReferenceException, WebDriverException):
        return "", []


def image_stats(crop: np.ndarray) -> dict:
    grey = crop.mean(axis=2)
    chroma = crop.max(axis=2) - crop.min(axis=2)
    return {
        "lit_fraction": float((grey > 25).mean()),  # not black background
        "grey_levels": int(len(np.unique(grey[chroma < 8].round()))),  # varied grey values: image content
        "grey_std": float(grey.std()),
        # warm overlay pixels (tumour red, edema yellow): red well above blue; OHIF's own UI text is blue/cyan
        "warm": int(((crop[..., 0] - crop[..., 2]) > 60).sum()),
    }


def shows_images(s: dict) -> bool:
    return s["lit_fraction"] > 0.05 and s["grey_levels"] > 64 and s["grey_std"] > 10


def open_study(driver, server_url: str, study_uid: str, timeout: float = 180.0):
    """Open the study in OHIF and wait until the viewport shows image pixels; returns (stats, screenshot)."""
    driver.get(f"{server_url}/ohif/viewer?StudyInstanceUIDs={study_uid}")
    deadline = time.monotonic() + timeout
    stats, shot = {}, None
    while time.monotonic() < deadline:
        click_button(driver, "Confirm and Hide")  # "investigational use" banner over the viewport
        box = viewport_box(driver)
        if box:
            shot = screenshot(driver)
            stats = image_stats(shot[box[1]:box[3], box[0]:box[2]])
            if shows_images(stats):
                return stats, shot, box
        time.sleep(1.0)
    return stats, shot, viewport_box(driver)


def save_png(arr: np.ndarray, name: str) -> Path:
    from PIL import Image

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    Image.fromarray(arr.astype(np.uint8)).save(path)
    return path


def ensure_final_label(stack, tmp_path) -> None:
    """A final label for the T2w series saved through the app (-> DICOM SEG in Orthanc), unless one is there."""
    import requests
    from monailabel.client import MONAILabelClient

    dw = DICOMwebClient(stack.orthanc.dicomweb_url)
    if dw.search_for_series(study_instance_uid=stack.study.study_uid, search_filters={"Modality": "SEG"}):
        return
    t2_id = stack.study.t2_series_uid
    r = requests.get(f"{stack.server.url}/datastore/image", params={"image": t2_id}, timeout=300)
    assert r.ok, stack.server.log_tail()
    image_file = tmp_path / "image.nii.gz"
    image_file.write_bytes(r.content)
    truth = labelmap_on_image_grid(phantom_labelmap(stack.bids_dir, "sub-001"), load_volume(image_file))
    label_file = save_volume(truth.data, truth.affine, tmp_path / "final.nii.gz")
    MONAILabelClient(stack.server.url).save_label(t2_id, str(label_file), tag="final")
    assert dw.search_for_series(study_instance_uid=stack.study.study_uid, search_filters={"Modality": "SEG"})


def test_ohif_monai_label_mode_opens_sagittal_series_and_panel_connects(stack, browser):
    """``make serve``'s promise: OHIF opens the study, and its MONAI Label panel talks to this server
    (its own port, not OHIF's default 8000) and lists the app's models."""
    from selenium.webdriver.common.action_chains import ActionChains

    url = stack.server.url
    assert stack.server.port != 8000
    n_slices = sum(1 for f in stack.study.files if f.parent.name == "T2w")
    browser.get(f"{url}/ohif/monai-label?StudyInstanceUIDs={stack.study.study_uid}")
    deadline = time.monotonic() + 180
    sagittal = None
    while time.monotonic() < deadline:
        click_button(browser, "Confirm and Hide")  # "investigational use" banner
        found = [v for v in viewports(browser).values() if is_sagittal(v["markers"]) and "T2w" in v["series"]]
        if found and f"/{n_slices})" in found[0]["position"] and browser.find_elements("css selector", "#monailabelServerURL"):
            shot = screenshot(browser)
            x0, y0, x1, y1 = found[0]["box"]
            if shows_images(image_stats(shot[y0:y1, x0:x1])):
                sagittal = found[0]
                break
        time.sleep(1.0)
    seen = viewports(browser)
    assert sagittal is not None, f"no viewport shows the T2w's {n_slices} sagittal slices with image pixels: {seen}"
    # the sagittal viewport steps through the series' own instances (I: k (k/N)); the others are reconstructions
    assert sum(1 for v in seen.values() if f"/{n_slices})" in v["position"]) == 1, seen

    # the panel is set to this server (the page's own origin), not to port 8000
    field = browser.find_element("css selector", "#monailabelServerURL")
    assert field.get_attribute("value") == f"{url}/", field.get_attribute("value")
    connect = browser.find_element("css selector", ".monaiLabelPanel button.actionButton")
    ActionChains(browser).move_to_element(connect).click().perform()
    models = ("cascade", "localiser", "tumor")
    deadline = time.monotonic() + 90
    def shown(text: str, options: list[str]) -> bool:  # the options fill in before the panel's text is drawn
        lines = {line.strip() for line in text.splitlines()}
        return set(models) <= set(options) and "IMSCT" in text and "Auto-Segmentation" in text and set(models) <= lines

    text, options = panel_text(browser)
    while not shown(text, options) and time.monotonic() < deadline:
        time.sleep(1.0)
        text, options = panel_text(browser)
    time.sleep(1.0)  # the "connected" notice fades
    path = save_png(screenshot(browser), "ohif_monailabel.png")
    assert set(models) <= set(options), f"the MONAI Label panel lists no models {models}: {text!r} {options} (screenshot {path})"
    assert "IMSCT" in text and "Auto-Segmentation" in text, text
    lines = {line.strip() for line in text.splitlines()}
    assert set(models) <= lines, text  # shown, not only in the drop-down's options


def test_ohif_shows_study_and_saved_segmentation(stack, browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    n_slices = sum(1 for f in stack.study.files if f.parent.name == "T2w")
    stats, shot, box = open_study(browser, stack.server.url, stack.study.study_uid)
    assert shot is not None and box is not None, "OHIF never drew a viewport canvas"
    assert shows_images(stats), stats
    focus_viewport(browser, box)
    for _ in range(n_slices // 2):  # to the middle slice (OHIF: arrow down = next image)
        ActionChains(browser).send_keys(Keys.ARROW_DOWN).perform()
    time.sleep(2)
    shot = screenshot(browser)
    stats = image_stats(shot[box[1]:box[3], box[0]:box[2]])
    path = save_png(shot, "ohif_study.png")
    assert shows_images(stats), f"viewport shows no MR image pixels: {stats} (screenshot {path})"
    assert stats["warm"] < 50, stats  # no overlay yet
    shown = list(viewports(browser).values())
    assert shown and is_sagittal(shown[0]["markers"]) and "T2w" in shown[0]["series"], shown  # the T2w as acquired
    # the T2w and the T1w Gd series are both in the study browser
    assert {"T2w", "T1w Gd"} <= {line.strip() for t in thumbnail_texts(browser) for line in t.splitlines()}

    ensure_final_label(stack, tmp_path)
    stats, shot, box = open_study(browser, stack.server.url, stack.study.study_uid)
    assert shows_images(stats), stats
    deadline = time.monotonic() + 60
    while not any("SEG" in t.split() for t in thumbnail_texts(browser)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert any("SEG" in t.split() for t in thumbnail_texts(browser)), "the saved DICOM SEG is not listed in the OHIF study browser"
    seg_thumb = browser.find_element("css selector", "[data-cy=study-browser-thumbnail-no-image]")
    ActionChains(browser).double_click(seg_thumb).perform()
    deadline = time.monotonic() + 60
    while not click_button(browser, "Yes") and time.monotonic() < deadline:  # OHIF asks before loading a SEG
        time.sleep(0.5)
    time.sleep(3)
    # step through the slices and keep the view with the most overlay
    focus_viewport(browser, box)
    best_stats, best_shot = None, None
    for _ in range(n_slices):
        time.sleep(0.8)
        shot = screenshot(browser)
        s = image_stats(shot[box[1]:box[3], box[0]:box[2]])
        if best_stats is None or s["warm"] > best_stats["warm"]:
            best_stats, best_shot = s, shot
        ActionChains(browser).send_keys(Keys.ARROW_DOWN).perform()
    path = save_png(best_shot, "ohif_segmentation.png")
    assert shows_images(best_stats), best_stats
    assert best_stats["warm"] > 200, f"no tumour/edema overlay visible on any slice: {best_stats} (screenshot {path})"

