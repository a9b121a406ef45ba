"""files, batches and corpus jobs

Revision ID: 0002_files_batches_corpus
Revises: 0001_create_jobs
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_files_batches_corpus"
down_revision: str | None = "0001_create_jobs"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "batches",
        sa.Column("id", sa.String(length=48), nullable=False),
        sa.Column("owner", sa.String(length=64), nullable=False),
        sa.Column("endpoint", sa.String(length=64), nullable=False),
        sa.Column("input_file_id", sa.String(length=48), nullable=False),
        sa.Column("completion_window", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("model", sa.String(length=255), nullable=True),
        sa.Column("metadata", sa.JSON(), nullable=True),
        sa.Column("errors", sa.JSON(), nullable=True),
        sa.Column("output_file_id", sa.String(length=48), nullable=True),
        sa.Column("error_file_id", sa.String(length=48), nullable=True),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("completed", sa.Integer(), nullable=False),
        sa.Column("failed", sa.Integer(), nullable=False),
        sa.Column("invalid", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        sa.Column("in_progress_at", sa.DateTime(), nullable=True),
        sa.Column("finalizing_at", sa.DateTime(), nullable=True),
        sa.Column("completed_at", sa.DateTime(), nullable=True),
        sa.Column("failed_at", sa.DateTime(), nullable=True),
        sa.Column("expired_at", sa.DateTime(), nullable=True),
        sa.Column("cancelling_at", sa.DateTime(), nullable=True),
        sa.Column("cancelled_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_batches")),
    )
    with op.batch_alter_table("batches", schema=None) as batch_op:
        batch_op.create_index("ix_batches_owner_id", ["owner", "id"], unique=False)
        batch_op.create_index("ix_batches_status", ["status"], unique=False)

    op.create_table(
        "corpus_jobs",
        sa.Column("id", sa.String(length=48), nullable=False),
        sa.Column("owner", sa.String(length=64), nullable=False),
        sa.Column("file_id", sa.String(length=48), nullable=False),
        sa.Column("model", sa.String(length=255), nullable=False),
        sa.Column("input_format", sa.String(length=16), nullable=False),
        sa.Column("text_field", sa.String(length=255), nullable=True),
        sa.Column("id_field", sa.String(length=255), nullable=True),
        sa.Column("output_format", sa.String(length=16), nullable=False),
        sa.Column("shard_size", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("texts_total", sa.BigInteger(), nullable=False),
        sa.Column("shards_total", sa.Integer(), nullable=False),
        sa.Column("output_file_id", sa.String(length=48), nullable=True),
        sa.Column("ids_file_id", sa.String(length=48), nullable=True),
        sa.Column("error", sa.JSON(), nullable=True),
        sa.Column("metadata", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=True),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_corpus_jobs")),
    )
    with op.batch_alter_table("corpus_jobs", schema=None) as batch_op:
        batch_op.create_index("ix_corpus_jobs_owner_id", ["owner", "id"], unique=False)
        batch_op.create_index("ix_corpus_jobs_status", ["status"], unique=False)

    op.create_table(
        "files",
        sa.Column("id", sa.String(length=48), nullable=False),
        sa.Column("owner", sa.String(length=64), nullable=False),
        sa.Column("purpose", sa.String(length=32), nullable=False),
        sa.Column("filename", sa.String(length=512), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("path", sa.String(length=1024), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_files")),
    )
    with op.batch_alter_table("files", schema=None) as batch_op:
        batch_op.create_index("ix_files_owner_id", ["owner", "id"], unique=False)

    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("parent_id", sa.String(length=48), nullable=True))
        batch_op.add_column(sa.Column("seq", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("custom_id", sa.String(length=512), nullable=True))
        batch_op.create_index("ix_jobs_parent_id_seq", ["parent_id", "seq"], unique=False)
        batch_op.create_unique_constraint("uq_jobs_parent_id_custom_id", ["parent_id", "custom_id"])


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_constraint("uq_jobs_parent_id_custom_id", type_="unique")
        batch_op.drop_index("ix_jobs_parent_id_seq")
        batch_op.drop_column("custom_id")
        batch_op.drop_column("seq")
        batch_op.drop_column("parent_id")

    with op.batch_alter_table("files", schema=None) as batch_op:
        batch_op.drop_index("ix_files_owner_id")

    op.drop_table("files")
    with op.batch_alter_table("corpus_jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_corpus_jobs_status")
        batch_op.drop_index("ix_corpus_jobs_owner_id")

    op.drop_table("corpus_jobs")
    with op.batch_alter_table("batches", schema=None) as batch_op:
        batch_op.drop_index("ix_batches_status")
        batch_op.drop_index("ix_batches_owner_id")

    op.drop_table("batches")
