import { defineConfig } from "vite";

// The console is embedded in the server binary (server/src/console.rs): fixed file names, one
// script and one stylesheet, no source maps, served under /dashboard/.
export default defineConfig({
  base: "/dashboard/",
  oxc: {
    jsx: { runtime: "automatic", importSource: "preact" },
  },
  build: {
    outDir: "dist",
    emptyOutDir: true,
    sourcemap: false,
    modulePreload: false,
    chunkSizeWarningLimit: 200,
    rolldownOptions: {
      output: {
        entryFileNames: "assets/console.js",
        chunkFileNames: "assets/console-[name].js",
        assetFileNames: "assets/console[extname]",
        codeSplitting: false,
      },
    },
  },
});
