// Time charts with uPlot: a time axis, units on the value axis, the values under the cursor in
// the legend, and bands between percentiles.
import { useEffect, useRef } from "preact/hooks";
import uPlot from "uplot";
import "uplot/dist/uPlot.min.css";

export interface Line {
  label: string;
  color: string;
  values: (number | null)[];
  dash?: boolean;
  /** Draw as steps (counts that hold until the next sample). */
  steps?: boolean;
}

export interface Band {
  /** Indexes into `lines`: the band is filled between them. */
  upper: number;
  lower: number;
  fill: string;
}

export interface ChartProps {
  title: string;
  unit: string;
  /** Unix seconds of each point. */
  x: number[];
  lines: Line[];
  bands?: Band[];
  width?: number;
  height?: number;
  /** The value axis starts at zero and reaches at least this. */
  floor?: number;
}

export function Chart(props: ChartProps) {
  const box = useRef<HTMLDivElement>(null);
  const plot = useRef<uPlot | null>(null);
  const { title, unit, x, lines, bands = [], width = 460, height = 180, floor = 0 } = props;
  const shape = `${title}|${unit}|${lines.map((l) => l.label).join(",")}|${width}`;

  useEffect(() => {
    if (!box.current) return;
    const fmt = (v: number | null) => (v == null ? "–" : `${+v.toPrecision(4)} ${unit}`);
    const opts: uPlot.Options = {
      title,
      width,
      height,
      scales: {
        x: { time: true },
        y: { range: (_u, _min, max) => [0, Math.max(floor, max == null ? floor : max * 1.1) || 1] },
      },
      axes: [{}, { label: unit, size: 60, values: (_u, ticks) => ticks.map((t) => `${+t.toPrecision(3)}`) }],
      series: [
        { value: (_u, v) => (v == null ? "–" : new Date(v * 1000).toISOString().slice(11, 19) + " UTC") },
        ...lines.map((l) => ({
          label: l.label,
          stroke: l.color,
          width: 2,
          dash: l.dash ? [6, 4] : undefined,
          value: (_u: uPlot, v: number | null) => fmt(v),
          points: { show: true, size: 4 },
          paths: l.steps ? uPlot.paths.stepped!({ align: 1 }) : undefined,
          spanGaps: false,
        })),
      ],
      bands: bands.map((b) => ({ series: [b.upper + 1, b.lower + 1] as [number, number], fill: b.fill })),
    };
    plot.current = new uPlot(opts, [x, ...lines.map((l) => l.values)] as uPlot.AlignedData, box.current);
    return () => {
      plot.current?.destroy();
      plot.current = null;
    };
    // Built again only when the chart's shape changes; data changes go through setData.
    // eslint-disable-next-line react-hooks/exhaustive-deps
  }, [shape]);

  useEffect(() => {
    plot.current?.setData([x, ...lines.map((l) => l.values)] as uPlot.AlignedData);
  }, [x, lines]);

  const most = Math.max(-Infinity, ...lines.flatMap((l) => l.values.filter((v): v is number => v != null)));
  return (
    <figure class="chart" data-chart={title} data-max={Number.isFinite(most) ? String(most) : ""}>
      <div ref={box} />
      {x.length === 0 && <figcaption class="muted">no data in this window</figcaption>}
    </figure>
  );
}
