"""The wires to a running VM: QMP (through qemu.qmp), the serial console, the guest agents.

``qmp`` is the boundary to qemu.qmp (its exceptions become qemukit's);
``console`` drains the serial console and classifies what the kernel prints;
``agent`` is the client of qemukit's own agent in the tiny guest; ``qga`` the
client of qemu-guest-agent. Each waits with a deadline; none knows about VMs.
"""
