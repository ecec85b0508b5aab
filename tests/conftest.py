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


@pytest.fixture(scope="session")
def sched():
    """DDPM's linear schedule, T = 1000."""
    from ddim_edu.schedules import linear_schedule

    return linear_schedule()


@pytest.fixture(scope="session")
def ring():
    """8 Gaussians of std 0.05 on the unit circle, whose exact ε is known."""
    from ddim_edu.mixture import GaussianMixture

    return GaussianMixture.ring(K=8, radius=1.0, std=0.05)
