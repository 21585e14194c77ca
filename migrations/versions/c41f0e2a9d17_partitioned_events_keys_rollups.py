"""Partitioned events, de-duplication keys, rollups.

On PostgreSQL the events table becomes a table partitioned by range of `timestamp` (weekly
partitions from Monday 00:00 UTC, and a default partition for older timestamps); its unique
constraint on (app_id, event_id) moves to the new event_keys table (a partitioned table
can only enforce keys that include the partition key). Every existing event is copied with
its key, and rollup deltas are made for them, so the stats count them once the rollup job
runs. On SQLite the events table stays a plain table and only loses the unique constraint.

Self-contained: it uses no application code.

Revision ID: c41f0e2a9d17
Revises: 3c4d5e6f7a81
Create Date: 2026-12-01 21:30:00.000000

"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = 'c41f0e2a9d17'
down_revision = '3c4d5e6f7a81'
branch_labels = None
depends_on = None

JSONDocument = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql')
# Weekly partitions are made for this many weeks back (older events go to the default
# partition) and ahead; app/retention.py keeps making them ahead afterwards.
WEEKS_BACK, WEEKS_AHEAD = 6, 4

EVENT_COLUMNS = ('id, app_id, event_id, event_name, level, user_id, "timestamp", received_at, processed_at, '
                 'validation, payload')


def _create_side_tables():
    op.create_table('event_keys',
    sa.Column('app_id', sa.String(length=36), nullable=False),
    sa.Column('event_id', sa.String(length=128), nullable=False),
    sa.Column('stored_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('app_id', 'event_id')
    )
    op.create_table('rollup_deltas',
    sa.Column('app_id', sa.String(length=36), nullable=False),
    sa.Column('minute', sa.DateTime(timezone=True), nullable=False),
    sa.Column('event_name', sa.String(length=255), nullable=False),
    sa.Column('level', sa.String(length=8), nullable=False),
    sa.Column('count', sa.Integer(), nullable=False),
    sa.Column('user_ids', JSONDocument, nullable=True),
    )
    op.create_table('rollups',
    sa.Column('app_id', sa.String(length=36), nullable=False),
    sa.Column('bucket', sa.String(length=1), nullable=False),
    sa.Column('start', sa.DateTime(timezone=True), nullable=False),
    sa.Column('event_name', sa.String(length=255), nullable=False),
    sa.Column('debug', sa.BigInteger(), nullable=False),
    sa.Column('info', sa.BigInteger(), nullable=False),
    sa.Column('warning', sa.BigInteger(), nullable=False),
    sa.Column('error', sa.BigInteger(), nullable=False),
    sa.Column('critical', sa.BigInteger(), nullable=False),
    sa.Column('users', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('app_id', 'bucket', 'start', 'event_name')
    )
    op.create_table('rollup_users',
    sa.Column('app_id', sa.String(length=36), nullable=False),
    sa.Column('bucket', sa.String(length=1), nullable=False),
    sa.Column('start', sa.DateTime(timezone=True), nullable=False),
    sa.Column('event_name', sa.String(length=255), nullable=False),
    sa.Column('user_id', sa.String(length=255), nullable=False),
    sa.PrimaryKeyConstraint('app_id', 'bucket', 'start', 'event_name', 'user_id')
    )


def upgrade():
    _create_side_tables()
    if op.get_bind().dialect.name == 'postgresql':
        _partition_events()
    else:
        with op.batch_alter_table('events', schema=None) as batch_op:
            batch_op.drop_constraint('uq_events_app_event_id', type_='unique')
        op.execute("INSERT INTO event_keys (app_id, event_id, stored_at) "
                   "SELECT app_id, event_id, min(processed_at) FROM events GROUP BY app_id, event_id")
        op.execute("""
            INSERT INTO rollup_deltas (app_id, minute, event_name, level, count, user_ids)
            SELECT app_id, strftime('%Y-%m-%d %H:%M:00.000000', "timestamp"), event_name, level, count(*),
                   CASE WHEN count(user_id) > 0 THEN json_group_array(DISTINCT user_id) FILTER (WHERE user_id IS NOT NULL) END
            FROM events GROUP BY 1, 2, 3, 4""")


def _partition_events():
    op.execute("SET LOCAL TimeZone = 'UTC'")
    op.execute("ALTER TABLE events RENAME TO events_unpartitioned")
    op.execute("ALTER SEQUENCE events_id_seq OWNED BY NONE")
    op.execute("""
        CREATE TABLE events (
            id bigint NOT NULL DEFAULT nextval('events_id_seq'),
            app_id varchar(36) NOT NULL,
            event_id varchar(128) NOT NULL,
            event_name varchar(255) NOT NULL,
            level varchar(8) NOT NULL,
            user_id varchar(255),
            "timestamp" timestamptz NOT NULL,
            received_at timestamptz NOT NULL,
            processed_at timestamptz NOT NULL,
            validation jsonb NOT NULL,
            payload jsonb NOT NULL,
            CONSTRAINT pk_events PRIMARY KEY (id, "timestamp")
        ) PARTITION BY RANGE ("timestamp")""")
    op.execute("ALTER SEQUENCE events_id_seq OWNED BY events.id")
    op.execute("CREATE TABLE events_default PARTITION OF events DEFAULT")
    op.execute(f"""
        DO $$
        DECLARE monday date := date_trunc('week', now() AT TIME ZONE 'UTC')::date;
        DECLARE first date;
        BEGIN
            first := greatest(monday - 7 * {WEEKS_BACK},
                              coalesce((SELECT date_trunc('week', min("timestamp") AT TIME ZONE 'UTC')::date
                                        FROM events_unpartitioned), monday));
            FOR week IN 0..((monday - first) / 7 + {WEEKS_AHEAD}) LOOP
                EXECUTE format('CREATE TABLE %I PARTITION OF events FOR VALUES FROM (%L) TO (%L)',
                               'events_p' || to_char(first + 7 * week, 'YYYYMMDD'),
                               (first + 7 * week)::timestamp AT TIME ZONE 'UTC',
                               (first + 7 * week + 7)::timestamp AT TIME ZONE 'UTC');
            END LOOP;
        END $$""")
    op.execute(f"INSERT INTO events ({EVENT_COLUMNS}) SELECT {EVENT_COLUMNS} FROM events_unpartitioned")
    op.execute("INSERT INTO event_keys (app_id, event_id, stored_at) "
               "SELECT app_id, event_id, processed_at FROM events_unpartitioned")
    op.execute("""
        INSERT INTO rollup_deltas (app_id, minute, event_name, level, count, user_ids)
        SELECT app_id, date_trunc('minute', "timestamp", 'UTC'), event_name, level, count(*),
               jsonb_agg(DISTINCT user_id) FILTER (WHERE user_id IS NOT NULL)
        FROM events_unpartitioned GROUP BY 1, 2, 3, 4""")
    op.execute("DROP TABLE events_unpartitioned")
    op.execute('CREATE INDEX ix_events_app_timestamp ON events (app_id, "timestamp" DESC, id DESC)')
    op.execute('CREATE INDEX ix_events_app_name_timestamp ON events (app_id, event_name, "timestamp" DESC)')
    op.execute("ANALYZE events")


def downgrade():
    if op.get_bind().dialect.name == 'postgresql':
        op.execute("ALTER TABLE events RENAME TO events_partitioned")
        op.execute("ALTER SEQUENCE events_id_seq OWNED BY NONE")
        op.execute("""
            CREATE TABLE events (
                id bigint NOT NULL DEFAULT nextval('events_id_seq') PRIMARY KEY,
                app_id varchar(36) NOT NULL,
                event_id varchar(128) NOT NULL,
                event_name varchar(255) NOT NULL,
                level varchar(8) NOT NULL,
                user_id varchar(255),
                "timestamp" timestamptz NOT NULL,
                received_at timestamptz NOT NULL,
                processed_at timestamptz NOT NULL,
                validation jsonb NOT NULL,
                payload jsonb NOT NULL,
                CONSTRAINT uq_events_app_event_id UNIQUE (app_id, event_id)
            )""")
        op.execute("ALTER SEQUENCE events_id_seq OWNED BY events.id")
        op.execute(f"INSERT INTO events ({EVENT_COLUMNS}) SELECT {EVENT_COLUMNS} FROM events_partitioned "
                   "ON CONFLICT (app_id, event_id) DO NOTHING")
        op.execute("DROP TABLE events_partitioned")
        op.execute('CREATE INDEX ix_events_app_timestamp ON events (app_id, "timestamp" DESC, id DESC)')
        op.execute('CREATE INDEX ix_events_app_name_timestamp ON events (app_id, event_name, "timestamp" DESC)')
    else:
        op.execute("DELETE FROM events WHERE id NOT IN (SELECT min(id) FROM events GROUP BY app_id, event_id)")
        with op.batch_alter_table('events', schema=None) as batch_op:
            batch_op.create_unique_constraint('uq_events_app_event_id', ['app_id', 'event_id'])
    op.drop_table('rollup_users')
    op.drop_table('rollups')
    op.drop_table('rollup_deltas')
    op.drop_table('event_keys')
