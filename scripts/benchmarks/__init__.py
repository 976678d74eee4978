"""qemukit's benchmarks, one module per part; ``scripts/bench`` runs them.

Every figure is a median over N runs (with min and max), and every comparison
is a ratio of two things measured side by side, interleaved, in one run.
Where qemukit is compared with QEMU started some other way (a bare Popen,
libvirt, virtme-ng), the other side runs the same QEMU binary qemukit picked
(``qemukit.host.find_qemu(DEFAULT_ARCH)``, which honours ``$QEMUKIT_QEMU``), and the part's
result records the binary each side used under ``qemu_binary``.

Parts: :mod:`.launch`, :mod:`.qmp`, :mod:`.loop`, :mod:`.cli`, :mod:`.rollback`,
:mod:`.restore`, :mod:`.scale`, :mod:`.warm`; optional: :mod:`.arch`, :mod:`.kloop` (needs a
kernel built here, which it builds once), and, with tools that may be missing, :mod:`.libvirt`
and :mod:`.virtme`. Shared helpers are in :mod:`.common`, the
command line in :mod:`.main`. Only qemukit's public API is used.
"""
