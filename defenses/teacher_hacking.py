"""Teacher-hacking detection during distillation, now in the engine: re-exported from
`secure_kd.teacher_hacking`.

One copy only: the monitor lives in `secure_kd.teacher_hacking` (so `train.teacher_hacking` of
`secure-kd distill` can use it); this name stays until every importer reads it from there.
"""

from secure_kd.teacher_hacking import MonitorPoint, TeacherHackingMonitor  # noqa: F401
