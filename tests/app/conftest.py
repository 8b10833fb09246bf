"""Fixtures of the MONAI Label app's tests."""

import pytest


@pytest.fixture(scope="session")
def stack(request, tmp_path_factory, phantom_dir):
    from support.dicomweb_stack import shared_stack, stack_missing_reason

    if stack_missing_reason():
        pytest.skip(stack_missing_reason())
    return shared_stack(request, tmp_path_factory, phantom_dir)
