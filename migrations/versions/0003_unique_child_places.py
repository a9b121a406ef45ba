"""one child job per place in its batch or corpus job

Revision ID: 0003_unique_child_places
Revises: 0002_files_batches_corpus
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0003_unique_child_places"
down_revision: str | None = "0002_files_batches_corpus"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Two coordinators could each insert a parent's children before this index
    # existed; keep the first row of each (parent, place), drop the copies.
    op.execute(
        "DELETE FROM jobs WHERE parent_id IS NOT NULL AND id NOT IN ("
        "SELECT MIN(id) FROM jobs WHERE parent_id IS NOT NULL GROUP BY parent_id, seq)"
    )
    op.drop_index("ix_jobs_parent_id_seq", table_name="jobs")
    op.create_index("uq_jobs_parent_id_seq", "jobs", ["parent_id", "seq"], unique=True)


def downgrade() -> None:
    op.drop_index("uq_jobs_parent_id_seq", table_name="jobs")
    op.create_index("ix_jobs_parent_id_seq", "jobs", ["parent_id", "seq"])
