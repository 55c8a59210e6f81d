"""maculaos_device: what runs on a MaculaOS node, shared with the SDK where both need the same facts.

On the device the package is `/usr/lib/maculaos/maculaos_device/` and `/usr/sbin/maculaos` runs its
`cli.main`. Standard library only, except `nodeconfig` (PyYAML). Modules:

    layout      the disk layout (partition names, type GUIDs, sizes, data folders)
    nodeconfig  the node config schema (`config.yaml`)
    yamlinput   YAML read safely: size, depth and alias caps, a key given twice named (profiles too)
    versions    release version ordering
    manifest    the signed bundle manifest and the per-slot record
    bootenv     the GRUB A/B environment (active, trial, tries, rolledback)
    paths       where things are on a node (the SDK renders templates and paths.sh from it)
    system      paths and hardware of a node, injectable for tests
    source      fetching bundles from a folder or a URL, size-capped
    updater     the update state machine: status, check, apply, rollback, confirm, watchdog
    installer   install from the live ISO, grow the data partition, factory reset
    applyconfig `maculaos config apply`: the node config applied at boot (maculaos-config)
    cli         the `maculaos` command
"""
