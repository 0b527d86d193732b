"""A tool that trains a small perspective depth teacher of our own on generated views.

``python -m student.perspective_teacher.train --out DIR ...`` (``train``), on the views of ``data``. It lives
beside the student, not in ``teacher_server``: the server serves teachers, this trains one; the weights it
writes are loaded by the server like any Hugging Face depth model.
"""
