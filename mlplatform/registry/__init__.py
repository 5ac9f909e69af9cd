"""An immutable, file-based model registry: numbered versions, movable aliases, later verdicts.

`store.Registry` is the registry itself; `mode` reaches it from the composed config
(`registry_for`), records the commit a version was trained from (`git_commit`) and runs
`+mode=registry`.

Layout under a root (a local path, or a pyarrow.fs URI for reading)::

    <root>/<model_name>/v1/model.safetensors   weights (safetensors: no pickle, safe to load)
    <root>/<model_name>/v1/<extra files>       model card, plots, reference data, label map...
    <root>/<model_name>/v1/version.json        written LAST: the commit marker
    <root>/<model_name>/v1/verdicts/*.json     gate verdicts recorded after the fact (new files only)
    <root>/<model_name>/aliases.json           {"production": "v3", "candidate": "v4"}

Why it is shaped this way:

* A version never changes once written, so "production = v3" means the same bytes tomorrow as
  today, and a rollback is just moving an alias back. Files are chmod 0o444 to say so.
* ``version.json`` is written last (atomically), so a crash mid-register leaves a directory
  without it, which every reader ignores: there is never a half-visible version.
* Every file's sha256 is stored in ``version.json`` and checked before use, so silent
  corruption (or a hand edit) refuses to load rather than serving wrong weights.
* Version numbers are claimed with ``os.mkdir`` (fails if the directory exists), so two
  processes registering at once get distinct versions without a lock server.
* ``aliases.json`` is rewritten under an exclusive ``fcntl.flock`` with write-temp-then-rename,
  so concurrent alias moves never lose each other and a crash never leaves half a file.

Limitation: ``register``, ``set_alias`` and ``remove_alias`` need a local (or POSIX-shared)
filesystem, because object stores have neither an atomic mkdir nor flock; on a URI root they
raise RegistryError. Reading (``versions``, ``get``, ``load_state_dict``, ``read_file``...)
and ``record_verdict`` (which only ever creates uniquely named files) work on URIs too.

torch and safetensors.torch are imported lazily, so resolving an alias (in a server, say) does
not pay for importing torch.
"""
