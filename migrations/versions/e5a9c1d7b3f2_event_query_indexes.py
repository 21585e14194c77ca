"""Indexes for the event listings: by level (above info) and by user, newest first; the look-up by event_id.

Revision ID: e5a9c1d7b3f2
Revises: c41f0e2a9d17
Create Date: 2026-12-01 21:40:00

"""
from alembic import op
import sqlalchemy as sa

# revision identifiers, used by Alembic.
revision = 'e5a9c1d7b3f2'
down_revision = 'c41f0e2a9d17'
branch_labels = None
depends_on = None

LOOKUP = 'ix_events_app_event_id'
LEVELS = "level IN ('warning', 'error', 'critical')"


def _has_lookup_index(bind) -> bool:
    """Whether some index or unique constraint of `events` starts with (app_id, event_id)."""
    inspector = sa.inspect(bind)
    indexes = inspector.get_indexes('events') + inspector.get_unique_constraints('events')
    return any(index['column_names'][:2] == ['app_id', 'event_id'] for index in indexes)


def upgrade():
    with op.batch_alter_table('events', schema=None) as batch_op:
        # Partial: the levels people look for. info and debug (most events) are listed through
        # ix_events_app_timestamp, and every index costs each write (README "Event queries").
        batch_op.create_index('ix_events_app_level_timestamp',
                              ['app_id', 'level', sa.literal_column('timestamp DESC'), sa.literal_column('id DESC')],
                              unique=False, postgresql_where=sa.text(LEVELS), sqlite_where=sa.text(LEVELS))
        batch_op.create_index('ix_events_app_user_timestamp',
                              ['app_id', 'user_id', sa.literal_column('timestamp DESC'), sa.literal_column('id DESC')],
                              unique=False, postgresql_where=sa.text('user_id IS NOT NULL'),
                              sqlite_where=sa.text('user_id IS NOT NULL'))
    # GET /api/apps/<app_id>/events/<event_id> looks events up by (app_id, event_id). Today the
    # unique constraint serves it; once `events` is partitioned by timestamp and de-duplication
    # lives in a table of its own, that constraint is gone and this index takes its place.
    if not _has_lookup_index(op.get_bind()):
        op.create_index(LOOKUP, 'events', ['app_id', 'event_id'], unique=False)


def downgrade():
    if LOOKUP in {index['name'] for index in sa.inspect(op.get_bind()).get_indexes('events')}:
        op.drop_index(LOOKUP, table_name='events')
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.drop_index('ix_events_app_user_timestamp')
        batch_op.drop_index('ix_events_app_level_timestamp')
