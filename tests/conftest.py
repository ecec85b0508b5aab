import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """The tests use small tensors, where intra-op threads only add synchronisation; on a busy
    machine they can make a step tens of times slower. One thread keeps timings predictable."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
