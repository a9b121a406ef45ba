"""running jobs hold a lease their worker renews

Revision ID: 0004_running_job_leases
Revises: 0003_unique_child_places
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_running_job_leases"
down_revision: str | None = "0003_unique_child_places"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Rows running at upgrade time keep NULL: they are judged by their replica's
    # heartbeat, as before, until a worker claims them again.
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("lease_until", sa.DateTime(), nullable=True))
    op.create_index("ix_jobs_status_lease_until", "jobs", ["status", "lease_until"])


def downgrade() -> None:
    op.drop_index("ix_jobs_status_lease_until", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("lease_until")
