"""Training: one trainer for every system.

Modules (import the one you need; ``loop`` pulls in data and checkpoint dependencies):

* ``optim``       schedules, AdamW with decay mask / per-path lr groups / frozen params
* ``state``       ``TrainState``, ``create_train_state``, ``abstract_train_state`` (AOT)
* ``step``        ``build_train_step``: the jitted, sharded, donated train step
* ``checkpoint``  Orbax manager: state + data iterator, resume, corrupt-step fallback
* ``metrics``     ``metrics.jsonl``, TensorBoard, progress bar
* ``flops``       the one FLOPs counter, peak FLOP/s table (measured on CPU) and MFU
* ``objectives``  ``Objective`` (one optimizer group each), ``layer_grads``, ``starts_at``
* ``loop``        ``train(config, workdir)`` and ``run_mode`` (sample / eval / export)
* ``aot``         ahead-of-time compile of the train step against a TPU topology (pod fit)

    python launch/tpu.py --config configs/captioner.py:demo --workdir /tmp/cap
"""
