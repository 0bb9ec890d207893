-- optmon schema v1: per-timeframe strike bars (CE and PE side by side), latest snapshot, underlying bars.
-- Bars are partitioned by day on bucket_time (UTC); partitions are created ahead by optmon_ensure_partitions().

CREATE TABLE bars_1m (
  underlying text NOT NULL,
  expiry date NOT NULL,
  strike double precision NOT NULL,      -- index points
  bucket_time timestamptz NOT NULL,      -- bucket start, UTC
  underlying_close double precision,     -- index points, at bar close
  atm_strike double precision,           -- listed strike of this expiry nearest underlying_close
  moneyness_level integer,               -- (strike - atm_strike) / strike step, stored at write time
  -- CE leg (NULL when the call has no data in the bucket)
  ce_open double precision,          -- first LTP of the bar, ₹
  ce_high double precision,          -- highest LTP, ₹
  ce_low double precision,           -- lowest LTP, ₹
  ce_close double precision,         -- last LTP, ₹
  ce_iv double precision,            -- IV at close, percent
  ce_delta double precision,
  ce_gamma double precision,
  ce_theta double precision,         -- ₹ per calendar day
  ce_vega double precision,          -- ₹ per IV point
  ce_oi bigint,                      -- OI at close, contracts
  ce_oi_change bigint,               -- OI at close - OI at the previous bar's close, contracts
  ce_volume bigint,                  -- contracts traded in the bar
  ce_day_volume bigint,              -- cumulative day volume at close (high-water mark), contracts
  ce_close_time timestamptz,         -- exchange time of the last tick in the bar (orders late ticks),
  -- PE leg (NULL when the put has no data in the bucket)
  pe_open double precision,          -- first LTP of the bar, ₹
  pe_high double precision,          -- highest LTP, ₹
  pe_low double precision,           -- lowest LTP, ₹
  pe_close double precision,         -- last LTP, ₹
  pe_iv double precision,            -- IV at close, percent
  pe_delta double precision,
  pe_gamma double precision,
  pe_theta double precision,         -- ₹ per calendar day
  pe_vega double precision,          -- ₹ per IV point
  pe_oi bigint,                      -- OI at close, contracts
  pe_oi_change bigint,               -- OI at close - OI at the previous bar's close, contracts
  pe_volume bigint,                  -- contracts traded in the bar
  pe_day_volume bigint,              -- cumulative day volume at close (high-water mark), contracts
  pe_close_time timestamptz,         -- exchange time of the last tick in the bar (orders late ticks),
  updated_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (underlying, expiry, strike, bucket_time)
) PARTITION BY RANGE (bucket_time);
CREATE INDEX bars_1m_snapshot_idx ON bars_1m (underlying, bucket_time, expiry);
CREATE INDEX bars_1m_moneyness_idx ON bars_1m (underlying, expiry, moneyness_level, bucket_time);

CREATE TABLE bars_5m (
  underlying text NOT NULL,
  expiry date NOT NULL,
  strike double precision NOT NULL,      -- index points
  bucket_time timestamptz NOT NULL,      -- bucket start, UTC
  underlying_close double precision,     -- index points, at bar close
  atm_strike double precision,           -- listed strike of this expiry nearest underlying_close
  moneyness_level integer,               -- (strike - atm_strike) / strike step, stored at write time
  -- CE leg (NULL when the call has no data in the bucket)
  ce_open double precision,          -- first LTP of the bar, ₹
  ce_high double precision,          -- highest LTP, ₹
  ce_low double precision,           -- lowest LTP, ₹
  ce_close double precision,         -- last LTP, ₹
  ce_iv double precision,            -- IV at close, percent
  ce_delta double precision,
  ce_gamma double precision,
  ce_theta double precision,         -- ₹ per calendar day
  ce_vega double precision,          -- ₹ per IV point
  ce_oi bigint,                      -- OI at close, contracts
  ce_oi_change bigint,               -- OI at close - OI at the previous bar's close, contracts
  ce_volume bigint,                  -- contracts traded in the bar
  ce_day_volume bigint,              -- cumulative day volume at close (high-water mark), contracts
  ce_close_time timestamptz,         -- exchange time of the last tick in the bar (orders late ticks),
  -- PE leg (NULL when the put has no data in the bucket)
  pe_open double precision,          -- first LTP of the bar, ₹
  pe_high double precision,          -- highest LTP, ₹
  pe_low double precision,           -- lowest LTP, ₹
  pe_close double precision,         -- last LTP, ₹
  pe_iv double precision,            -- IV at close, percent
  pe_delta double precision,
  pe_gamma double precision,
  pe_theta double precision,         -- ₹ per calendar day
  pe_vega double precision,          -- ₹ per IV point
  pe_oi bigint,                      -- OI at close, contracts
  pe_oi_change bigint,               -- OI at close - OI at the previous bar's close, contracts
  pe_volume bigint,                  -- contracts traded in the bar
  pe_day_volume bigint,              -- cumulative day volume at close (high-water mark), contracts
  pe_close_time timestamptz,         -- exchange time of the last tick in the bar (orders late ticks),
  updated_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (underlying, expiry, strike, bucket_time)
) PARTITION BY RANGE (bucket_time);
CREATE INDEX bars_5m_snapshot_idx ON bars_5m (underlying, bucket_time, expiry);
CREATE INDEX bars_5m_moneyness_idx ON bars_5m (underlying, expiry, moneyness_level, bucket_time);

CREATE TABLE bars_15m (
  underlying text NOT NULL,
  expiry date NOT NULL,
  strike double precision NOT NULL,      -- index points
  bucket_time timestamptz NOT NULL,      -- bucket start, UTC
  underlying_close double precision,     -- index points, at bar close
  atm_strike double precision,           -- listed strike of this expiry nearest underlying_close
  moneyness_level integer,               -- (strike - atm_strike) / strike step, stored at write time
  -- CE leg (NULL when the call has no data in the bucket)
  ce_open double precision,          -- first LTP of the bar, ₹
  ce_high double precision,          -- highest LTP, ₹
  ce_low double precision,           -- lowest LTP, ₹
  ce_close double precision,         -- last LTP, ₹
  ce_iv double precision,            -- IV at close, percent
  ce_delta double precision,
  ce_gamma double precision,
  ce_theta double precision,         -- ₹ per calendar day
  ce_vega double precision,          -- ₹ per IV point
  ce_oi bigint,                      -- OI at close, contracts
  ce_oi_change bigint,               -- OI at close - OI at the previous bar's close, contracts
  ce_volume bigint,                  -- contracts traded in the bar
  ce_day_volume bigint,              -- cumulative day volume at close (high-water mark), contracts
  ce_close_time timestamptz,         -- exchange time of the last tick in the bar (orders late ticks),
  -- PE leg (NULL when the put has no data in the bucket)
  pe_open double precision,          -- first LTP of the bar, ₹
  pe_high double precision,          -- highest LTP, ₹
  pe_low double precision,           -- lowest LTP, ₹
  pe_close double precision,         -- last LTP, ₹
  pe_iv double precision,            -- IV at close, percent
  pe_delta double precision,
  pe_gamma double precision,
  pe_theta double precision,         -- ₹ per calendar day
  pe_vega double precision,          -- ₹ per IV point
  pe_oi bigint,                      -- OI at close, contracts
  pe_oi_change bigint,               -- OI at close - OI at the previous bar's close, contracts
  pe_volume bigint,                  -- contracts traded in the bar
  pe_day_volume bigint,              -- cumulative day volume at close (high-water mark), contracts
  pe_close_time timestamptz,         -- exchange time of the last tick in the bar (orders late ticks),
  updated_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (underlying, expiry, strike, bucket_time)
) PARTITION BY RANGE (bucket_time);
CREATE INDEX bars_15m_snapshot_idx ON bars_15m (underlying, bucket_time, expiry);
CREATE INDEX bars_15m_moneyness_idx ON bars_15m (underlying, expiry, moneyness_level, bucket_time);

CREATE TABLE bars_1h (
  underlying text NOT NULL,
  expiry date NOT NULL,
  strike double precision NOT NULL,      -- index points
  bucket_time timestamptz NOT NULL,      -- bucket start, UTC
  underlying_close double precision,     -- index points, at bar close
  atm_strike double precision,           -- listed strike of this expiry nearest underlying_close
  moneyness_level integer,               -- (strike - atm_strike) / strike step, stored at write time
  -- CE leg (NULL when the call has no data in the bucket)
  ce_open double precision,          -- first LTP of the bar, ₹
  ce_high double precision,          -- highest LTP, ₹
  ce_low double precision,           -- lowest LTP, ₹
  ce_close double precision,         -- last LTP, ₹
  ce_iv double precision,            -- IV at close, percent
  ce_delta double precision,
  ce_gamma double precision,
  ce_theta double precision,         -- ₹ per calendar day
  ce_vega double precision,          -- ₹ per IV point
  ce_oi bigint,                      -- OI at close, contracts
  ce_oi_change bigint,               -- OI at close - OI at the previous bar's close, contracts
  ce_volume bigint,                  -- contracts traded in the bar
  ce_day_volume bigint,              -- cumulative day volume at close (high-water mark), contracts
  ce_close_time timestamptz,         -- exchange time of the last tick in the bar (orders late ticks),
  -- PE leg (NULL when the put has no data in the bucket)
  pe_open double precision,          -- first LTP of the bar, ₹
  pe_high double precision,          -- highest LTP, ₹
  pe_low double precision,           -- lowest LTP, ₹
  pe_close double precision,         -- last LTP, ₹
  pe_iv double precision,            -- IV at close, percent
  pe_delta double precision,
  pe_gamma double precision,
  pe_theta double precision,         -- ₹ per calendar day
  pe_vega double precision,          -- ₹ per IV point
  pe_oi bigint,                      -- OI at close, contracts
  pe_oi_change bigint,               -- OI at close - OI at the previous bar's close, contracts
  pe_volume bigint,                  -- contracts traded in the bar
  pe_day_volume bigint,              -- cumulative day volume at close (high-water mark), contracts
  pe_close_time timestamptz,         -- exchange time of the last tick in the bar (orders late ticks),
  updated_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (underlying, expiry, strike, bucket_time)
) PARTITION BY RANGE (bucket_time);
CREATE INDEX bars_1h_snapshot_idx ON bars_1h (underlying, bucket_time, expiry);
CREATE INDEX bars_1h_moneyness_idx ON bars_1h (underlying, expiry, moneyness_level, bucket_time);

-- The newest bar per (underlying, timeframe, expiry, strike): "latest" never scans for MAX(bucket_time).
CREATE TABLE bars_latest (
  underlying text NOT NULL,
  timeframe smallint NOT NULL,           -- optmon.v1.Timeframe number (1=1M, 2=5M, 3=15M, 4=1H)
  expiry date NOT NULL,
  strike double precision NOT NULL,
  bucket_time timestamptz NOT NULL,
  underlying_close double precision,
  atm_strike double precision,
  moneyness_level integer,
  -- CE leg (NULL when the call has no data in the bucket)
  ce_open double precision,          -- first LTP of the bar, ₹
  ce_high double precision,          -- highest LTP, ₹
  ce_low double precision,           -- lowest LTP, ₹
  ce_close double precision,         -- last LTP, ₹
  ce_iv double precision,            -- IV at close, percent
  ce_delta double precision,
  ce_gamma double precision,
  ce_theta double precision,         -- ₹ per calendar day
  ce_vega double precision,          -- ₹ per IV point
  ce_oi bigint,                      -- OI at close, contracts
  ce_oi_change bigint,               -- OI at close - OI at the previous bar's close, contracts
  ce_volume bigint,                  -- contracts traded in the bar
  ce_day_volume bigint,              -- cumulative day volume at close (high-water mark), contracts
  ce_close_time timestamptz,         -- exchange time of the last tick in the bar (orders late ticks),
  -- PE leg (NULL when the put has no data in the bucket)
  pe_open double precision,          -- first LTP of the bar, ₹
  pe_high double precision,          -- highest LTP, ₹
  pe_low double precision,           -- lowest LTP, ₹
  pe_close double precision,         -- last LTP, ₹
  pe_iv double precision,            -- IV at close, percent
  pe_delta double precision,
  pe_gamma double precision,
  pe_theta double precision,         -- ₹ per calendar day
  pe_vega double precision,          -- ₹ per IV point
  pe_oi bigint,                      -- OI at close, contracts
  pe_oi_change bigint,               -- OI at close - OI at the previous bar's close, contracts
  pe_volume bigint,                  -- contracts traded in the bar
  pe_day_volume bigint,              -- cumulative day volume at close (high-water mark), contracts
  pe_close_time timestamptz,         -- exchange time of the last tick in the bar (orders late ticks),
  updated_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (underlying, timeframe, expiry, strike)
);

-- Underlying index bars per timeframe (small: no partitioning).
CREATE TABLE underlying_bars (
  underlying text NOT NULL,
  timeframe smallint NOT NULL,
  bucket_time timestamptz NOT NULL,
  open double precision NOT NULL,
  high double precision NOT NULL,
  low double precision NOT NULL,
  close double precision NOT NULL,
  close_time timestamptz NOT NULL,       -- exchange time of the last tick in the bar
  updated_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (underlying, timeframe, bucket_time)
);

-- Creates the daily partitions of every bar table for [p_from, p_to] (inclusive, UTC days). Idempotent.
CREATE FUNCTION optmon_ensure_partitions(p_from date, p_to date) RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
  d date;
  t text;
  n integer := 0;
BEGIN
  FOR d IN SELECT generate_series(p_from, p_to, interval '1 day')::date LOOP
    FOREACH t IN ARRAY ARRAY['bars_1m', 'bars_5m', 'bars_15m', 'bars_1h'] LOOP
      IF to_regclass(format('%s_%s', t, to_char(d, 'YYYYMMDD'))) IS NULL THEN
        EXECUTE format('CREATE TABLE %I PARTITION OF %I FOR VALUES FROM (%L) TO (%L)',
                       t || '_' || to_char(d, 'YYYYMMDD'), t,
                       (d::timestamp AT TIME ZONE 'UTC'), ((d + 1)::timestamp AT TIME ZONE 'UTC'));
        n := n + 1;
      END IF;
    END LOOP;
  END LOOP;
  RETURN n;
END $$;

-- Drops daily partitions whose whole day is before p_before (retention). Returns the number dropped.
CREATE FUNCTION optmon_drop_partitions_before(p_before date) RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
  r record;
  n integer := 0;
BEGIN
  FOR r IN
    SELECT c.relname FROM pg_inherits i
      JOIN pg_class c ON c.oid = i.inhrelid
      JOIN pg_class p ON p.oid = i.inhparent
     WHERE p.relname IN ('bars_1m', 'bars_5m', 'bars_15m', 'bars_1h')
       AND to_date(right(c.relname, 8), 'YYYYMMDD') < p_before
  LOOP
    EXECUTE format('DROP TABLE %I', r.relname);
    n := n + 1;
  END LOOP;
  RETURN n;
END $$;
