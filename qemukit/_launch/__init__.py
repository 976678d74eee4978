"""Launching QEMU: the command line, the launch plan, the processes, the runtime directory.

``argv`` turns a spec and host facts into QEMU's argv (pure); ``plan`` decides
every file, daemon and argument of one start (pure); ``process`` is where
QEMU and its helper daemons are spawned, watched and reaped; ``runtime`` is a
VM's runtime directory (``vm.json``, sockets, logs, the operation lock);
``registry`` lists and cleans up runtime directories; ``seed`` writes the
cloud-init seed and the ssh key; ``usernet`` reads QEMU's user-net forwards.
``start`` carries a plan out (the host checks before it, overlays, seed and
daemons, the spawn); it sits above :mod:`qemukit.host`, the others below it.
Nothing here talks QMP.
"""
