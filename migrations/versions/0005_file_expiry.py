"""files may expire (OpenAI's expires_after)

Revision ID: 0005_file_expiry
Revises: 0004_running_job_leases
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_file_expiry"
down_revision: str | None = "0004_running_job_leases"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("files") as batch:
        batch.add_column(sa.Column("expires_at", sa.DateTime(), nullable=True))
    op.create_index("ix_files_expires_at", "files", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_files_expires_at", table_name="files")
    with op.batch_alter_table("files") as batch:
        batch.drop_column("expires_at")
