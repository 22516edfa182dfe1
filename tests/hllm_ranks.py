"""A DDP rank of test_hllm's gather test, in a module light enough for ``mp.spawn`` to import quickly."""
import torch
import torch.distributed as dist

from recbole_llm.model.hllm_layers import gather_negatives


def gather_on_rank(rank, port, queue):
    """Rank ``rank`` of 2 gathers two rows of value rank + 1; row r of the gathered rows weighs r in the loss."""
    dist.init_process_group("gloo", rank=rank, world_size=2, init_method=f"tcp://localhost:{port}")
    local = torch.full((2, 3), float(rank + 1), requires_grad=True)
    gathered = gather_negatives(local)
    (gathered * torch.arange(4.0)[:, None]).sum().backward()
    queue.put((rank, gathered.detach().tolist(), local.grad[:, 0].tolist()))
    dist.destroy_process_group()
