import pytest
import torch

from ranksearch.datasets import load_task
from ranksearch.training import pretrained


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Small models run fastest, and most repeatably, on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session", autouse=True)
def user_cache(tmp_path_factory):
    """Reference models trained by the tests go to a scratch cache, never the user's."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RANKSEARCH_CACHE", str(tmp_path_factory.mktemp("user-cache")))
        yield


@pytest.fixture(scope="session")
def digits():
    """The digits task (scikit-learn's digits, 1×8×8)."""
    return load_task("digits")


@pytest.fixture(scope="session")
def digits_model(tmp_path_factory, digits):
    """A digits CNN trained once per test session."""
    return pretrained("digits-cnn", "digits", cache_dir=tmp_path_factory.mktemp("ckpt"),
                      task=digits, epochs=8)
