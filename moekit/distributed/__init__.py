"""moekit.distributed: expert parallelism over torch.distributed, layered onto a built model.

    groups = init_expert_parallel(ep_size)          # after torch.distributed.init_process_group
    parallelize_experts(model, groups)              # shard experts, install the all-to-all dispatcher
    optimizer = ...                                 # built after: the expert parameters are shards
    attach_expert_bias_updates(model, optimizer, groups)   # loss-free balancing, if enabled
    ... loss.backward(); sync_gradients(model, groups); optimizer.step()

Checkpoints with each rank's experts apart, merge and re-shard: `moekit.distributed.checkpoint`
(and `moekit checkpoint merge|reshard`). The LM trainer's expert-parallel strategy lives in
`moekit.train.lm_parallel` (`torchrun --nproc_per_node N -m moekit train lm --expert-parallel P`). Local test launches:
`moekit.distributed.launch.spawn`.

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
