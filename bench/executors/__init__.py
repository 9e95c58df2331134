"""Ways to run the same stage objects: ``sequential`` (the reference, one process),
``distributed`` (one process per stage on torch.distributed, started by ``launch``), with
``pipeline`` (pipelined BP), ``asynchronous`` (DGL from a replay buffer) and ``neurons``
(GN-DGL neuron groups on ranks of their own); ``links`` carries their messages. ``ddp``
(data-parallel BP on K ranks, also started by ``launch``) is the baseline a user with K
workers would otherwise run. All three run their epochs through ``epochs``."""
