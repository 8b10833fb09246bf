"""Files the tool writes get the mode a plain open() would give and appear whole or not at all."""

import os
import stat

import numpy as np
import pytest

from imsct.io import WriteError, replace_atomically, save_volumes, write_text_atomically


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield 0o640
    os.umask(old)


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_outputs_get_the_umask_mode_not_0600(tmp_path, umask_027):
    seg, prob = save_volumes([(np.ones((4, 4, 4)), np.eye(4), tmp_path / "out" / "a_seg.nii.gz", np.uint8),
                              (np.zeros((4, 4, 4)), np.eye(4), tmp_path / "out" / "a_prob.nii.gz", np.float32)])
    write_text_atomically(tmp_path / "out" / "report.json", "{}")
    assert {_mode(seg), _mode(prob), _mode(tmp_path / "out" / "report.json")} == {umask_027}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a_prob.nii.gz", "a_seg.nii.gz", "report.json"]


def test_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "summary.json"
    write_text_atomically(target, '{"old": 1}')

    def half_then_fail(out):
        out.write(b'{"new": ')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        replace_atomically(target, half_then_fail)
    assert target.read_text() == '{"old": 1}'
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_all_or_nothing_removes_what_it_staged_when_one_file_fails(tmp_path):
    (tmp_path / "b_seg.nii.gz").mkdir()  # a folder where a file should go: the second item fails
    with pytest.raises(WriteError, match="b_seg.nii.gz"):
        save_volumes([(np.ones((4, 4, 4)), np.eye(4), tmp_path / "a_seg.nii.gz", np.uint8),
                      (np.ones((4, 4, 4)), np.eye(4), tmp_path / "b_seg.nii.gz", np.uint8)])
    assert [p.name for p in tmp_path.iterdir()] == ["b_seg.nii.gz"]
