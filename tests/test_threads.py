import os

import pytest
import torch

from deeprec_env.threads import limit_threads, set_threads, thread_settings


def test_limit_threads_restores_the_process_setting():
    before = torch.get_num_threads()
    with limit_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with limit_threads(None):
        assert torch.get_num_threads() == before


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_set_threads_rejects_bad_counts(bad):
    with pytest.raises(ValueError, match="must be an int >= 1"):
        set_threads(torch_threads=bad)


def test_forked_child_is_single_threaded_and_does_not_hang():
    import deeprec_env  # noqa: F401  (registers the fork hook)

    torch.set_num_threads(2)
    torch.ones(256, 256) @ torch.ones(256, 256)  # the parent's OpenMP pool exists
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: without the hook this matmul would hang in the inherited pool
        os.close(r)
        n = torch.get_num_threads()
        torch.ones(256, 256) @ torch.ones(256, 256)
        os.write(w, str(n).encode())
        os._exit(0)
    os.close(w)
    import select

    ready, _, _ = select.select([r], [], [], 60)
    if not ready:
        os.kill(pid, 9)
        pytest.fail("the forked child hung")
    assert os.read(r, 16) == b"1"
    os.waitpid(pid, 0)
    assert thread_settings()["torch threads (process)"] == 2
