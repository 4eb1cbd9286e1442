"""ACE tests run their tiny models on one thread: with other processes on the 2 cores, two threads made a
tiny-UNet explanation 10-50x slower (29 s instead of 0.6 s for the same call, measured), and one thread is
as fast as two for models this small."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
