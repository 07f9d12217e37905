"""moekit.distributed: expert parallelism over torch.distributed, layered onto a built model.

    groups = init_expert_parallel(ep_size)          # after torch.distributed.init_process_group
    parallelize_experts(model, groups)              # shard experts, install the all-to-all dispatcher
    ... loss.backward(); sync_gradients(model, groups); optimizer.step()

`moekit.layers` and `moekit.models` never import torch.distributed; this package does.
"""

from moekit.distributed.expert_parallel import (
    AllToAllDispatcher,
    ExpertParallelGroups,
    all_to_all,
    attach_expert_bias_updates,
    data_parallel,
    expert_parameter_names,
    init_expert_parallel,
    parallelize_experts,
    sync_gradients,
    update_expert_biases,
)

__all__ = [
    "AllToAllDispatcher", "ExpertParallelGroups", "all_to_all", "attach_expert_bias_updates", "data_parallel",
    "expert_parameter_names", "init_expert_parallel", "parallelize_experts", "sync_gradients",
    "update_expert_biases",
]
